"""HAT-Net's CPU inference form: every block's MLP runs on cache-sized slices of the batch.

Each block's MLP (``InvertedResidual``) expands the map 4-8x (hat_net_tiny's first stage: 384 x 56 x 56
floats, 4.6 MiB per image) and passes over that hidden map four times (expand, SiLU, depth-wise, SiLU).
Run on slices of the batch whose hidden map is at most ``SLICE_BYTES``, those passes hit the cache instead
of memory: hat_net_tiny and small at batch 16, 224 x 224 gain about 1.4x in throughput. Every operation of
the MLP is per image, so the output is the whole batch's.

``optimize_for_cpu(model)`` switches a model to this form in place. It is always safe to apply: the sliced
MLP runs the whole batch in training, on other devices, and under torch.compile and tracing (their graphs
must not depend on the batch size); timm's torch.fx tracer keeps it as one call, other torch.fx tracers
get the whole-batch MLP, and torch.jit.script puts the plain whole-batch MLP back in its place. The ONNX
export writes the same slicing as a loop over the batch with its own budget (``hatnet.export.hat_net_onnx``),
using the same ``images_per_slice`` rule.
"""
import copy

import torch
from timm.layers import register_notrace_module
from torch import nn

from .hat_net import InvertedResidual

__all__ = ['SLICE_BYTES', 'SlicedInvertedResidual', 'images_per_slice', 'optimize_for_cpu']

SLICE_BYTES = 16 << 20  # best budget for eager PyTorch on CPU (docs/performance.md)


def images_per_slice(x: torch.Tensor, hidden_channels: int, value_bytes: int, slice_bytes: int) -> int:
    """How many images of ``x`` fit ``slice_bytes`` with their (hidden_channels, H, W) hidden map (at least one)."""
    return max(1, slice_bytes // (x.shape[2] * x.shape[3] * hidden_channels * value_bytes))


@register_notrace_module  # the number of slices depends on tensor sizes: timm's fx tracer keeps one call
class SlicedInvertedResidual(InvertedResidual):
    """``InvertedResidual`` that runs eager CPU inference on slices of at most ``slice_bytes`` hidden map."""
    slice_bytes: int = SLICE_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training keeps every hidden map for autograd anyway, traced / compiled graphs must not depend on
        # the batch size, and other devices do not share this cache effect
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # torch.fx tracers other than timm's (e.g. torchvision's create_feature_extractor) trace into the
            # module: they get the whole-batch MLP, whose graph does not depend on sizes
            return super().forward(x)
        if self.training or x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        n = images_per_slice(x, self.fc1.out_channels, x.element_size(), self.slice_bytes)
        if n >= len(x):
            return super().forward(x)
        return torch.cat([super(SlicedInvertedResidual, self).forward(part) for part in x.split(n)])

    def __prepare_scriptable__(self) -> nn.Module:
        # TorchScript cannot call a parent's forward: torch.jit.script puts this whole-batch copy (same
        # parameters) in the module's place, in the model too
        plain = copy.copy(self)
        plain.__class__ = InvertedResidual
        return plain


def optimize_for_cpu(model: nn.Module, slice_bytes: int = SLICE_BYTES) -> nn.Module:
    """Switch every HAT-Net MLP of ``model`` to its batch-sliced CPU inference form, in place; returns ``model``.

    Weights, state_dict and outputs are unchanged; models without HAT-Net MLPs are left as they are.
    ``slice_bytes``: the largest hidden map (bytes) one slice may hold.
    """
    for module in model.modules():
        if type(module) in (InvertedResidual, SlicedInvertedResidual):
            module.__class__ = SlicedInvertedResidual
            module.slice_bytes = slice_bytes
    return model
