"""Shape classes taken from real instance-norm workloads (torch-free).

Each class has its full-size shapes (GPU runs) and a few tiny shapes of the same rank (``--smoke``,
which runs through Triton's interpreter on the CPU), so a smoke run exercises the same class
names, ranks and plot layout. Add a class with ``register_shape_class(ShapeClass(...))`` in this
file or in any module imported before a command parses ``--classes``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Layouts of x and dy; "channels_last" needs 4-d shapes, "channels_last_3d" 5-d shapes.
MEMORY_FORMAT_RANK = {"contiguous": None, "channels_last": 4, "channels_last_3d": 5}


@dataclass(frozen=True)
class ShapeClass:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    smoke_shapes: tuple[tuple[int, ...], ...]
    memory_format: str = "contiguous"
    is_sweep: bool = False  # drawn as a connected curve in the bandwidth-vs-plane-size plot

    def __post_init__(self):
        if self.memory_format not in MEMORY_FORMAT_RANK:
            raise ValueError(f"{self.name}: unknown memory_format {self.memory_format!r}")
        rank = MEMORY_FORMAT_RANK[self.memory_format]
        for shape in self.shapes + self.smoke_shapes:
            if len(shape) < 3 or rank not in (None, len(shape)):
                raise ValueError(f"{self.name}: {shape} is not an (N, C, *spatial) shape "
                                 f"for {self.memory_format}")


SHAPE_CLASSES: dict[str, ShapeClass] = {}


def register_shape_class(shape_class: ShapeClass) -> ShapeClass:
    if shape_class.name in SHAPE_CLASSES:
        raise ValueError(f"shape class {shape_class.name!r} is already registered")
    SHAPE_CLASSES[shape_class.name] = shape_class
    return shape_class


def plane_sweep_shapes(total_log2: int, plane_log2_lo: int, plane_log2_hi: int):
    """(1, 2^total / P, P) with P = 2^lo .. 2^hi: the total size, hence the copy roof, stays
    fixed and only the reduction length changes along the curve."""
    total = 1 << total_log2
    return tuple((1, total >> p, 1 << p) for p in range(plane_log2_lo, plane_log2_hi + 1))


_STYLE = ((4, 32, 256, 256), (4, 64, 128, 128), (4, 128, 64, 64))  # fast style transfer nets
_NNUNET = ((2, 32, 128, 128, 128), (2, 320, 8, 8, 8), (2, 64, 64, 64, 64))  # nnU-Net stages
for _cls in (
    ShapeClass("style_transfer_2d", _STYLE, ((2, 4, 16, 16),)),
    ShapeClass("gan_2d", ((1, 64, 256, 256), (16, 256, 64, 64)), ((1, 4, 32, 32),)),  # CycleGAN
    ShapeClass("nnunet_3d", _NNUNET, ((1, 3, 8, 8, 8),)),
    # Deep layers of small images: many channels, tiny planes.
    ShapeClass("tiny_planes", ((64, 2048, 7, 7), (256, 512, 4, 4)), ((4, 16, 3, 3),)),
    # Few very large planes: little parallelism across planes.
    ShapeClass("huge_planes", ((1, 4, 1024, 1024), (1, 1, 2048, 2048)), ((1, 1, 64, 64),)),
    # The same workloads in NHWC / NDHWC, to compare with their contiguous twins.
    ShapeClass("style_transfer_2d_channels_last", _STYLE, ((2, 4, 16, 16),), "channels_last"),
    ShapeClass("nnunet_3d_channels_last", _NNUNET, ((1, 3, 8, 8, 8),), "channels_last_3d"),
    ShapeClass("plane_sweep", plane_sweep_shapes(24, 6, 22), plane_sweep_shapes(10, 4, 8),
               is_sweep=True),
):
    register_shape_class(_cls)


def class_order(name: str):
    """Sort key: registration order, then unknown classes (from an older CSV) by name."""
    names = list(SHAPE_CLASSES)
    return (names.index(name), "") if name in SHAPE_CLASSES else (len(names), name)


def select_classes(names: list[str] | None) -> list[ShapeClass]:
    unknown = [n for n in names or [] if n not in SHAPE_CLASSES]
    if unknown:
        raise SystemExit(f"unknown shape class(es) {unknown}; known: {sorted(SHAPE_CLASSES)}")
    return [SHAPE_CLASSES[n] for n in names] if names else list(SHAPE_CLASSES.values())
