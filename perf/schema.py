"""What the result files hold: their CSV columns and the names that fill them (torch-free).

The dtype and direction names are perf/model.py's (``DTYPES``, ``DIRECTIONS``: the byte model is
keyed by them); the shape classes, perf/shapes.py's. perf/README.md describes every column.
"""

from __future__ import annotations

# Every row starts with where and when it was measured (machine.environment fills them).
ENV_COLUMNS = ["device", "torch", "triton", "date"]

# --------------------------------------------------------------------------- the bandwidth report

# Who computes the timed instance norm (perf/providers.py builds each one).
OURS, CLUSTERS, EAGER, COMPILE, ROOF = (
    "triton_instnorm", "triton_instnorm_clusters", "torch_eager", "torch_compile", "copy")
FLAG_GEMS, LIGER = "flag_gems", "liger_groupnorm"
NORM_PROVIDERS = [OURS, EAGER, COMPILE]
PEER_PROVIDERS = [FLAG_GEMS, LIGER]
PROVIDERS = [OURS, CLUSTERS, EAGER, COMPILE, *PEER_PROVIDERS, ROOF]
BASELINES = [EAGER, COMPILE, *PEER_PROVIDERS]  # what triton_instnorm's speedup is taken against

BANDWIDTH_COLUMNS = [*ENV_COLUMNS, "shape_class", "shape", "dtype", "direction", "provider", "ms",
                     "gbps", "pct_of_roof"]
BANDWIDTH_KEY = ("shape_class", "shape", "dtype", "direction", "provider")  # one row per key

# --------------------------------------------------------------------------- the training steps

PYTORCH = "pytorch"  # the network with torch's layers; OURS: after networks.to_triton
VARIANTS = [PYTORCH, OURS]
MODES = ["eager", "compile"]

TRAINING_COLUMNS = [*ENV_COLUMNS, "network", "batch", "input_shape", "dtype", "memory_format",
                    "variant", "mode", "ms_per_step", "speedup_vs_pytorch", "peak_mem_mb", "loss",
                    "loss_rel_err", "grad_rel_err", "instnorm_launches", "check"]
TRAINING_KEY = ("network", "variant", "mode")


def rank(order, value):
    """Sort key: position in ``order``, values not in it (from an older CSV) last."""
    return order.index(value) if value in order else len(order)
