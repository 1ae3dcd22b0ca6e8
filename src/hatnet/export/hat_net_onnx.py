"""hat_net's ONNX forms: the same outputs as the eager modules, written for onnxruntime.

ONNX graphs are NCHW and run by onnxruntime, whose best layout differs from the eager model's channels_last
one. ``onnx_forms(model)`` returns a copy of the model in which the norms, the attention and the MLPs are
replaced by subclasses whose forward writes the graph for onnxruntime; the export traces that copy, so the
model itself never asks whether it is being exported and the user's model is left untouched.

* ``OnnxGroupNorm1``: one LayerNormalization node over (C, H, W), fast or precise kernel by map size;
* ``OnnxHierarchicalAttention``: heads as (head_dim, tokens) planes of the NCHW projections, and a local
  step shaped for onnxruntime's blocked convolution layout (``grid_attention_onnx``);
* ``OnnxInvertedResidual``: the MLP as a loop over cache-sized slices of the batch, like the eager CPU form
  (``hatnet.models.runtime``) with onnxruntime's best budget.
"""
import copy
import functools
import warnings
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.hat_net import (GroupNorm1, HierarchicalAttention, InvertedResidual, _cell_key_mask, _grid_cells,
                              _grid_padding)
from ..models.runtime import SlicedInvertedResidual, images_per_slice

__all__ = ['OnnxGroupNorm1', 'OnnxHierarchicalAttention', 'OnnxInvertedResidual', 'grid_attention_onnx',
           'onnx_forms']


class _LayerNormOverCHW(torch.autograd.Function):
    """GroupNorm(1, C) written to ONNX as one LayerNormalization over (C, H, W).

    onnxruntime runs that as one kernel (instead of eleven nodes). It has two paths, chosen by the shape of
    the affine: with a full (C, H, W) affine a fast one that sums in float32 one value after the other, so its
    error grows with the map (6e-6 up to 2^18 values per image, 6e-4 at 250 x 336 x 48); with a (C, 1, 1)
    affine a precise one (2e-7 at any size) that takes about twice the time. The graph picks the path from
    the map's size at run time: the fast one for maps of up to ``FAST_PATH_MAX_VALUES`` values.
    """
    FAST_PATH_MAX_VALUES = 1 << 18

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.group_norm(x, 1, weight, bias, eps)

    @staticmethod
    def symbolic(g, x, weight, bias, eps: float):
        def constant(values):
            return g.op('Constant', value_t=torch.tensor(values))

        map_shape = g.op('Shape', x, start_i=1)
        small = g.op('LessOrEqual', g.op('ReduceProd', map_shape, keepdims_i=0),
                     constant(_LayerNormOverCHW.FAST_PATH_MAX_VALUES))
        affine_shape = g.op('Where', small, map_shape, constant([1, 1, 1]))

        def affine(param):
            return g.op('Expand', g.op('Reshape', param, constant([-1, 1, 1])), affine_shape)

        return g.op('LayerNormalization', x, affine(weight), affine(bias), axis_i=1, epsilon_f=eps)


class OnnxGroupNorm1(GroupNorm1):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNormOverCHW.apply(x, self.weight, self.bias, self.eps)


def _plane_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention on (..., head_dim, tokens) planes, the form in which NCHW maps hold heads:
    q (..., D, N), k and v (..., D, M) -> (..., D, N).

    onnxruntime folds the transposed operands into its matrix multiplications, so no tensor is transposed in
    memory.
    """
    scores = torch.matmul(q.transpose(-1, -2), k) * scale
    return torch.matmul(v, scores.softmax(-1).transpose(-1, -2))


def grid_attention_onnx(x: torch.Tensor, qkv_proj: nn.Conv2d, grid_size: int, num_heads: int) -> torch.Tensor:
    """The local step as written to ONNX: normalised map (B, C, H, W) -> ``grid_attention(qkv_proj(x))``.

    A form of its own rather than the eager ``grid_attention``, because onnxruntime runs convolutions in a
    blocked layout and reorders their outputs, which makes other data movements cheap:
    * the C-channel input is padded rather than the 3C-channel projection (the projections of the zero
      padding are only ever masked as keys or dropped as queries);
    * q, k and v are projected by three convolutions with slices of the qkv weights, so that no split copy
      follows, and each is asked for in NHWC, which the reorder out of its convolution writes directly;
    * in NHWC every block that gathering or scattering the grid cells moves is one head's D contiguous values.
    Padding is always applied (zero-sized when the cells fit) so that the graph serves every input size.
    """
    B, C, H, W = x.shape
    head_dim = C // num_heads
    pad_h, pad_w = _grid_padding(H, W, grid_size)
    rows, cols = _grid_cells(H, W, grid_size)
    cells, cell = rows * cols, grid_size * grid_size
    valid = _cell_key_mask(H, W, grid_size, x.device)
    key_bias = torch.zeros(valid.shape).masked_fill(~valid, float('-inf'))

    # each of q, k, v: (B, [rows, G], [cols, G], [heads, D]) -> (B, cells, heads, G * G, D)
    padded = F.pad(x, (0, pad_w, 0, pad_h))
    q, k, v = [
        F.conv2d(padded, weight, bias).permute(0, 2, 3, 1)
        .reshape(B, rows, grid_size, cols, grid_size, num_heads, head_dim).permute(0, 1, 3, 5, 2, 4, 6)
        .reshape(B, cells, num_heads, cell, head_dim)
        for weight, bias in zip(qkv_proj.weight.chunk(3), qkv_proj.bias.chunk(3))]
    scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5 + key_bias
    x = torch.matmul(scores.softmax(-1), v)
    # (B, rows, cols, heads, G, G, D) -> (B, [rows, G], [cols, G], [heads, D])
    x = x.reshape(B, rows, cols, num_heads, grid_size, grid_size, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, rows * grid_size, cols * grid_size, C)[:, :H, :W].permute(0, 3, 1, 2)


class OnnxHierarchicalAttention(HierarchicalAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW maps: heads are (head_dim, tokens) planes of the projections, reached by reshapes
        B, C, H, W = x.shape
        scale = self.head_dim ** -0.5
        if self.grid_norm is None:
            qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, self.head_dim, H * W)
            out = _plane_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], scale).reshape(B, C, H, W)
        else:
            local = self.grid_norm(x + grid_attention_onnx(self.norm(x), self.qkv, self.grid_size, self.num_heads))
            q = self.q(local).reshape(B, self.num_heads, self.head_dim, H * W)
            kv = self.kv(self.ds_norm(self.pool(local))).reshape(B, 2, self.num_heads, self.head_dim, -1)
            out = local + _plane_attention(q, kv[:, 0], kv[:, 1], scale).reshape(B, C, H, W)
        return self.proj_drop(self.proj(out))


def _expand_in_slices(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        dw_weight: torch.Tensor,
        fc2_weight: torch.Tensor,
        slice_bytes: int,
        dw_padding: int,
        dw_groups: int,
) -> torch.Tensor:
    """fc1 -> SiLU -> depth-wise -> SiLU -> fc2 on groups of images whose hidden map fits ``slice_bytes``."""
    n = images_per_slice(x, fc1_weight.shape[0], 4, slice_bytes)  # the export is float32
    outputs: List[torch.Tensor] = []
    for start in range(0, x.shape[0], n):
        hidden = F.silu(F.conv2d(x[start:start + n], fc1_weight))
        hidden = F.silu(F.conv2d(hidden, dw_weight, padding=dw_padding, groups=dw_groups))
        outputs.append(F.conv2d(hidden, fc2_weight))
    return torch.cat(outputs)


@functools.cache
def _scripted_expand_in_slices():
    # scripted, not traced: tracing would unroll the loop for the example batch, the script becomes an ONNX Loop
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated with the exporter it serves
        return torch.jit.script(_expand_in_slices)


class OnnxInvertedResidual(InvertedResidual):
    onnx_slice_bytes: int = 4 << 20  # onnxruntime's best budget on CPU (docs/performance.md)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference only (no dropout); the batch and the map size are dynamic in the graph
        hidden = _scripted_expand_in_slices()(
            self.norm(x), self.fc1.weight, self.conv_dw.weight, self.fc2.weight,
            self.onnx_slice_bytes, self.conv_dw.padding[0], self.conv_dw.groups)
        return self.norm_out(hidden)


_ONNX_FORMS = {
    GroupNorm1: OnnxGroupNorm1,
    HierarchicalAttention: OnnxHierarchicalAttention,
    InvertedResidual: OnnxInvertedResidual,
    SlicedInvertedResidual: OnnxInvertedResidual,
}


def onnx_forms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose hat_net modules write their ONNX forms (other modules are copied as they are)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        form = _ONNX_FORMS.get(type(module))
        if form is not None:
            module.__class__ = form
    return model
