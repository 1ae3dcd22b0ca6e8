"""Multiply-accumulate counts, in the two conventions users meet.

* ``layers``: convolutions, linear and normalisation layers, what module-hook counters see. This is how
  the paper's table counts HAT-Net (2.0 / 4.3 / 8.3 / 11.5 G at 224 x 224).
* ``attention``: the q·kᵀ and attn·v matrix products of every attention step, which module-hook counters
  miss. ``total = layers + attention``.

PyTorch's ``FlopCounterMode`` counts one forward pass on meta tensors: shapes only, so it takes well under
a second, no memory, and works for a model on any device (a tracing counter records the whole graph first,
seconds per model). Its formulas cover the matrix products, convolutions and attention kernels; the ones
below add the other layers in the conventions of fvcore, the counter behind the published tables: a
normalisation costs 4 MACs per element (5 with an affine), an inference batch norm 2 (1 without affine), a
mean (global average pooling, also inside squeeze-excitation) 1 per input element, nearest / bilinear
upsampling 1 / 4 per output element.
"""
import itertools
import math
from typing import Dict, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


# FlopCounterMode's formulas get the shapes of the tensor arguments and return FLOPs (2 per MAC)
def _norm_flops(weight_index: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(args[0]) * (5 if args[weight_index] is not None else 4)
    return flops


def _inference_batch_norm_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * (2 if weight_shape is not None else 1)


def _per_input_element(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape)


def _per_output_element(macs_per_element: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * macs_per_element * math.prod(out_shape)
    return flops


_FORMULAS = {
    aten.native_group_norm: _norm_flops(1),  # (input, weight, bias, ...)
    aten.native_layer_norm: _norm_flops(2),  # (input, normalized_shape, weight, bias, eps)
    aten._native_batch_norm_legit_no_training: _inference_batch_norm_flops,
    aten.mean: _per_input_element,  # global average pooling (adaptive pooling to 1 x 1 is a mean)
    aten._adaptive_avg_pool2d: _per_input_element,
    aten.upsample_nearest2d: _per_output_element(1),
    aten.upsample_bilinear2d: _per_output_element(4),
}


def _is_attention(op_name: str) -> bool:
    # batched matrix products are the attention's q·kᵀ and attn·v (linear layers reach mm / addmm)
    return 'attention' in op_name or op_name in ('bmm', 'baddbmm')


def count_macs(model: torch.nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, float]:
    """MACs of one forward pass on a single image, in the conventions above (units: MACs, not G).

    Counted in eval mode (batch norm as in inference); every module's train / eval mode is restored after.
    """
    modes = [(module, module.training) for module in model.modules()]
    on_meta = {name: tensor.to('meta')
               for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())}
    x = torch.zeros(1, *input_size, dtype=next(model.parameters()).dtype, device='meta')
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_FORMULAS) as counter:
            torch.func.functional_call(model, on_meta, (x,))
    finally:
        for module, training in modes:
            module.training = training
    flops = {str(op).split('.')[-1]: n for op, n in counter.get_flop_counts()['Global'].items()}
    attention = sum(n for op, n in flops.items() if _is_attention(op)) / 2
    layers = sum(flops.values()) / 2 - attention
    return dict(layers=float(layers), attention=float(attention), total=float(layers + attention))
