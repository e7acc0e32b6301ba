"""triton_instnorm: fused Instance Normalization for PyTorch, written in Triton.

    import triton_instnorm as tin
    y = tin.instance_norm(x, weight=w, bias=b)          # like torch.nn.functional.instance_norm
    layer = tin.InstanceNorm2d(64, affine=True)         # like torch.nn.InstanceNorm2d
"""

from .adain import AdaIN, AdaptiveInstanceNorm2d, adain, adaptive_instance_norm, instance_stats
from .convert import convert_instance_norm, revert_instance_norm
from .explain import explain
from .fusion import register_block
from .functional import instance_norm, kernels_available
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .onnx_export import onnx_translation_table  # also registers the TorchScript symbolics
from .routing import disable, enable, enabled, is_enabled

__version__ = "0.1.0"

__all__ = [
    "instance_norm",
    "adaptive_instance_norm",
    "adain",
    "instance_stats",
    "explain",
    "AdaptiveInstanceNorm2d",
    "AdaIN",
    "kernels_available",
    "convert_instance_norm",
    "revert_instance_norm",
    "register_block",
    "enable",
    "disable",
    "enabled",
    "is_enabled",
    "onnx_translation_table",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]
