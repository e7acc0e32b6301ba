"""Named shape classes taken from real instance-norm workloads.

Each class carries its full-size shapes (GPU runs) and a few tiny shapes of
the same rank (``--smoke``, which runs through Triton's CPU interpreter), so a
smoke run exercises the same class names, ranks and plot layout as a real run.

To add a class call
``register_shape_class(ShapeClass(...))`` from this file or any module imported
before ``perf.report.main`` parses ``--classes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Memory formats a class may ask for; perf.bench maps them to torch formats.
MEMORY_FORMATS = ("contiguous", "channels_last", "channels_last_3d")


@dataclass(frozen=True)
class ShapeClass:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    smoke_shapes: tuple[tuple[int, ...], ...]
    description: str = ""
    # Layout of the input tensor; "channels_last" needs 4-d shapes,
    # "channels_last_3d" needs 5-d shapes.
    memory_format: str = "contiguous"
    # Classes drawn as a connected curve in the bandwidth-vs-plane-size plot.
    is_sweep: bool = field(default=False)

    def __post_init__(self):
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"{self.name}: unknown memory_format {self.memory_format!r}")
        want_rank = {"channels_last": 4, "channels_last_3d": 5}.get(self.memory_format)
        for shape in self.shapes + self.smoke_shapes:
            if len(shape) < 3:
                raise ValueError(f"{self.name}: instance norm needs (N, C, *spatial), got {shape}")
            if want_rank is not None and len(shape) != want_rank:
                raise ValueError(f"{self.name}: {self.memory_format} needs rank {want_rank}, got {shape}")


SHAPE_CLASSES: dict[str, ShapeClass] = {}


def register_shape_class(shape_class: ShapeClass) -> ShapeClass:
    if shape_class.name in SHAPE_CLASSES:
        raise ValueError(f"shape class {shape_class.name!r} is already registered")
    SHAPE_CLASSES[shape_class.name] = shape_class
    return shape_class


def plane_sweep_shapes(total_log2: int, plane_log2_lo: int, plane_log2_hi: int):
    """(1, 2^total / P, P) 1-d instance-norm inputs with P = 2^lo .. 2^hi.

    The total size stays fixed, so the copy roof is the same for every point
    and only the reduction length changes along the curve.
    """
    total = 1 << total_log2
    return tuple((1, total >> p, 1 << p) for p in range(plane_log2_lo, plane_log2_hi + 1))


register_shape_class(ShapeClass(
    "style_transfer_2d",
    shapes=((4, 32, 256, 256), (4, 64, 128, 128), (4, 128, 64, 64)),
    smoke_shapes=((2, 4, 16, 16),),
    description="fast neural style transfer generators (Johnson et al., Ulyanov et al.)",
))
register_shape_class(ShapeClass(
    "gan_2d",
    shapes=((1, 64, 256, 256), (16, 256, 64, 64)),
    smoke_shapes=((1, 4, 32, 32),),
    description="CycleGAN / pix2pix style generators",
))
register_shape_class(ShapeClass(
    "nnunet_3d",
    shapes=((2, 32, 128, 128, 128), (2, 320, 8, 8, 8), (2, 64, 64, 64, 64)),
    smoke_shapes=((1, 3, 8, 8, 8),),
    description="nnU-Net 3-d medical segmentation encoder/decoder stages",
))
register_shape_class(ShapeClass(
    "tiny_planes",
    shapes=((64, 2048, 7, 7), (256, 512, 4, 4)),
    smoke_shapes=((4, 16, 3, 3),),
    description="many channels with very small planes (deep layers, small images)",
))
register_shape_class(ShapeClass(
    "huge_planes",
    shapes=((1, 4, 1024, 1024), (1, 1, 2048, 2048)),
    smoke_shapes=((1, 1, 64, 64),),
    description="few very large planes: little parallelism across planes",
))
# Native channels_last: the same workloads in NHWC / NDHWC, to compare with the
# contiguous classes above (the target is within 10% of their bandwidth).
register_shape_class(ShapeClass(
    "style_transfer_2d_channels_last",
    shapes=((4, 32, 256, 256), (4, 64, 128, 128), (4, 128, 64, 64)),
    smoke_shapes=((2, 4, 16, 16),),
    description="style_transfer_2d in channels_last",
    memory_format="channels_last",
))
register_shape_class(ShapeClass(
    "nnunet_3d_channels_last",
    shapes=((2, 32, 128, 128, 128), (2, 320, 8, 8, 8), (2, 64, 64, 64, 64)),
    smoke_shapes=((1, 3, 8, 8, 8),),
    description="nnunet_3d in channels_last_3d",
    memory_format="channels_last_3d",
))
register_shape_class(ShapeClass(
    "plane_sweep",
    shapes=plane_sweep_shapes(total_log2=24, plane_log2_lo=6, plane_log2_hi=22),
    smoke_shapes=plane_sweep_shapes(total_log2=10, plane_log2_lo=4, plane_log2_hi=8),
    description="fixed 2^24 elements, plane size 2^6..2^22 (bandwidth vs plane size)",
    is_sweep=True,
))


def class_order(name: str):
    """Sort key: registration order, then unknown classes (from an older CSV) by name."""
    names = list(SHAPE_CLASSES)
    return (names.index(name), "") if name in SHAPE_CLASSES else (len(names), name)


def select_classes(names: list[str] | None) -> list[ShapeClass]:
    if not names:
        return list(SHAPE_CLASSES.values())
    unknown = [n for n in names if n not in SHAPE_CLASSES]
    if unknown:
        raise SystemExit(f"unknown shape class(es) {unknown}; known: {sorted(SHAPE_CLASSES)}")
    return [SHAPE_CLASSES[n] for n in names]
