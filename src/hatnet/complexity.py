"""Multiply-accumulate counts (fvcore), in the two conventions users meet.

* ``layers``: convolutions, linear and normalisation layers, what module-hook counters see. This is how
  the paper's table counts HAT-Net (2.0 / 4.3 / 8.3 / 11.5 G at 224 x 224).
* ``attention``: the q·kᵀ and attn·v matrix products of every attention step, which module-hook counters
  miss. ``total = layers + attention``.
"""
import math
import warnings
from typing import Dict, Sequence

import torch

_ATTENTION_OPS = ('scaled_dot_product_attention', 'matmul', 'bmm', 'einsum')


def _sdpa_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    # q (..., L, E) @ k^T (..., E, S)  +  attn (..., L, S) @ v (..., S, Ev)
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _elementwise_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    return math.prod(get_shape(outputs[0]))


def count_macs(model: torch.nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, float]:
    """MACs of one forward pass on a single image, in the conventions above (units: MACs, not G)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # fvcore scripts a helper with the deprecated torch.jit
        from fvcore.nn import FlopCountAnalysis
    model = model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings about shape-dependent Python values
        analysis = FlopCountAnalysis(model, x).set_op_handle(
            'aten::scaled_dot_product_attention', _sdpa_macs,
            # the per-channel affine of HAT-Net's GroupNorm1 (F.group_norm without affine, then addcmul): one
            # MAC per element, which fvcore counts inside its group_norm handle for nn.GroupNorm
            'aten::addcmul', _elementwise_macs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    attention = sum(v for k, v in by_op.items() if k in _ATTENTION_OPS)
    layers = sum(by_op.values()) - attention
    return dict(layers=float(layers), attention=float(attention), total=float(layers + attention))
