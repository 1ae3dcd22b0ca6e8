""" HAT-Net: Vision Transformers with Hierarchical Attention

Paper: `Vision Transformers with Hierarchical Attention` - https://arxiv.org/abs/2106.03180
    Yun Liu, Yu-Huan Wu, Guolei Sun, Le Zhang, Ajad Chhatkuli, Luc Van Gool.
    Machine Intelligence Research 21, 670-683 (2024).

HAT-Net is a four-stage convolutional pyramid (strides 4/8/16/32) whose blocks pair an inverted-residual
MLP with H-MHSA, hierarchical multi-head self-attention:

* local step: tokens attend to each other inside non-overlapping G x G grid cells;
* global step: every token attends to an average-pooled (down-sampled) copy of the locally attended map.

The last stage, whose map is small, uses plain global self-attention. Numerically this module is the
original implementation (github.com/yun-liu/HAT-Net) and loads its checkpoints through
``checkpoint_filter_fn``; the module layout follows timm (stage i owns its downsampling, then its blocks).

Any input resolution
--------------------
The original code only runs when every stage's map divides into whole grid cells, i.e. image sides that are
multiples of 224. Here any size >= 32 x 32 works, and sizes the original accepts give the same numbers:

* Local step: the q/k/v map is zero-padded at the bottom/right to whole G x G cells and the padded
  positions are masked out as keys, so a valid token only ever attends to valid tokens of its own cell.
  Padded queries are computed and dropped. The result for valid tokens is exactly that of attention over
  the valid part of each (ragged) edge cell.
* Global step: the pooling uses ``ceil_mode=True``; a ragged edge cell becomes one pooled token that is the
  mean of the valid pixels it covers (PyTorch does not count out-of-bounds positions when there is no
  explicit padding). Every pixel contributes to exactly one pooled token.
* Downsampling (3x3, stride 2, padding 1) rounds odd sides up, so stage i has ceil(H / 2^(i+2)) rows.

Memory layout
-------------
The stem converts the images to channels_last and every stage keeps that layout (feature maps and
intermediates come out channels_last; ``.contiguous()`` gives NCHW memory). On CPU the depth-wise
convolutions and the 1x1 projections are several times faster in NHWC, q/k/v are strided views of the
projection output that ``F.scaled_dot_product_attention`` reads directly, and its output is already the
NHWC map, so each H-MHSA copies data only to gather and scatter the grid cells.

ONNX graphs are NCHW and run by onnxruntime, whose best layout is different: while exporting, the norms,
the attention and the MLPs switch to forms written for it (``GroupNorm1._forward_onnx``,
``HierarchicalAttention._attend_onnx``, ``InvertedResidual._forward_onnx``), which give the same outputs.

The unused ``proj_norm``
------------------------
The original attention module creates a GroupNorm ``proj_norm`` that its forward never applies. Its
weights are in every released checkpoint and in the published parameter counts, so it is kept. In training
mode it is tied into the graph with a zero factor, so that every parameter receives a (zero) gradient:
DistributedDataParallel without ``find_unused_parameters`` and gradient checks rely on that.
"""
import functools
import re
import warnings
from dataclasses import dataclass
from urllib.error import URLError
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import PretrainedCfg, build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..fileio import read_state_dict, unwrap_state_dict
from ..errors import CheckpointError, InputError

__all__ = ['HatNet', 'checkpoint_filter_fn', 'guess_variant', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 32  # smallest image side accepted


@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> None:
    """Reject inputs that are not (B, in_chans, H >= 32, W >= 32) with one clear message."""
    if x.dim() != 4:
        raise InputError(
            'expected a 4-D image batch (batch, channels, height, width), got shape ' + str(list(x.shape)))
    if x.shape[1] != in_chans:
        raise InputError('expected ' + str(in_chans) + ' input channels, got ' + str(x.shape[1])
                         + ' (image batch of shape ' + str(list(x.shape)) + ')')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise InputError('image is too small: ' + str(x.shape[2]) + 'x' + str(x.shape[3])
                         + ', HAT-Net needs at least ' + str(min_size) + 'x' + str(min_size))


@torch.jit.unused
def _exporting_onnx() -> bool:
    """True while torch.onnx.export traces the model: norms and attention then write their ONNX forms."""
    return torch.onnx.is_in_onnx_export()


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (the original's norm layer), computed on the channels_last memory order.

    Same statistics (all values of a sample), per-channel affine and state_dict as ``nn.GroupNorm(1, C)``.
    PyTorch's GroupNorm kernel for channels_last inputs accumulates in a way that loses precision as the map
    grows (max |logit error| 1e-4 at 672 x 672 px, against 3e-6 here); normalising the (H, W, C)-ordered
    values as one flat group, then applying the per-channel affine, keeps the precision and the speed. The
    ONNX export writes its own form (see ``_forward_onnx``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(1, num_channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _exporting_onnx():
            return self._forward_onnx(x)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view of the channels_last map
        normed = F.group_norm(x.reshape(x.shape[0], 1, -1), 1, eps=self.eps).view(x.shape)
        return torch.addcmul(self.bias, normed, self.weight).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _forward_onnx(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNormOverCHW.apply(x, self.weight, self.bias, self.eps)


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


def _to_heads(x: torch.Tensor, parts: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """(B, parts * C, H, W) -> (parts, B, heads, H * W, head_dim), a view when x is channels_last.

    Channels are ordered [part][head][head_dim], the order of the original 1x1 q/k/v projections.
    """
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, parts, num_heads, head_dim).permute(2, 0, 3, 1, 4)


def _from_heads(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H * W, head_dim) -> (B, heads * head_dim, H, W) in channels_last, a view of SDPA's output."""
    B, num_heads, _, head_dim = x.shape
    return x.transpose(1, 2).reshape(B, height, width, num_heads * head_dim).permute(0, 3, 1, 2)


def _grid_padding(height: int, width: int, grid_size: int) -> Tuple[int, int]:
    """Rows and columns of zeros that complete the bottom / right edge cells of a grid_size grid."""
    return (grid_size - height % grid_size) % grid_size, (grid_size - width % grid_size) % grid_size


def _cell_key_mask(height: int, width: int, grid_size: int, device: torch.device) -> torch.Tensor:
    """(cells, 1, 1, G * G): True for each cell's keys that lie inside the height x width map (cells row-major)."""
    pad_h, pad_w = _grid_padding(height, width, grid_size)
    rows, cols = (height + pad_h) // grid_size, (width + pad_w) // grid_size
    valid = (torch.arange(height + pad_h, device=device) < height)[:, None] & \
        (torch.arange(width + pad_w, device=device) < width)
    valid = valid.reshape(rows, grid_size, cols, grid_size).transpose(1, 2)
    return valid.reshape(rows * cols, 1, 1, grid_size * grid_size)


@register_notrace_function
def grid_attention(qkv: torch.Tensor, grid_size: int, num_heads: int) -> torch.Tensor:
    """Local step of H-MHSA: self-attention inside each grid_size x grid_size cell.

    qkv: (B, 3 * C, H, W) -> (B, C, H, W). Ragged edge cells are padded to full size and the padding is
    masked out as keys (see the module docstring). Traced graphs (torch.compile, torch.jit.trace) pad and mask
    unconditionally (zero-sized and all true when the cells fit) so that one graph serves every input size;
    eager runs skip both when the cells fit (an all-true mask still costs SDPA ~10 % of the model's time).
    """
    B, C3, H, W = qkv.shape
    C = C3 // 3
    pad_h, pad_w = _grid_padding(H, W, grid_size)
    rows, cols = (H + pad_h) // grid_size, (W + pad_w) // grid_size
    cells, cell = rows * cols, grid_size * grid_size

    # (B, H, W, 3C) is a view of the channels_last map; one copy gathers the cells (after padding, if any)
    # and q, k, v are strided views of it: (B * cells, heads, tokens per cell, head_dim)
    qkv = qkv.permute(0, 2, 3, 1)
    key_mask: Optional[torch.Tensor] = None
    # compiling / tracing is tested first: a symbolic pad size must not decide the graph
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or pad_h > 0 or pad_w > 0:
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        key_mask = _cell_key_mask(H, W, grid_size, qkv.device).repeat(B, 1, 1, 1)
    qkv = qkv.reshape(B, rows, grid_size, cols, grid_size, C3).transpose(2, 3)
    qkv = qkv.reshape(B * cells, cell, 3, num_heads, C // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

    x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B * cells, heads, cell, head_dim)
    x = x.transpose(1, 2).reshape(B, rows, cols, grid_size, grid_size, C).transpose(2, 3)
    return x.reshape(B, rows * grid_size, cols * grid_size, C)[:, :H, :W].permute(0, 3, 1, 2)


def _plane_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention on (..., head_dim, tokens) planes, the form in which NCHW maps hold heads:
    q (..., D, N), k and v (..., D, M) -> (..., D, N).

    Written for the ONNX export: onnxruntime folds the transposed operands into its matrix multiplications,
    so no tensor is transposed in memory.
    """
    scores = torch.matmul(q.transpose(-1, -2), k) * scale
    return torch.matmul(v, scores.softmax(-1).transpose(-1, -2))


def _grid_attention_onnx(x: torch.Tensor, qkv_proj: nn.Conv2d, grid_size: int, num_heads: int) -> torch.Tensor:
    """Local step as written to ONNX: normalised map (B, C, H, W) -> ``grid_attention(qkv_proj(x))``.

    Shaped for onnxruntime, which runs convolutions in a blocked layout and reorders their outputs:
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
    rows, cols = (H + pad_h) // grid_size, (W + pad_w) // grid_size
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


class HierarchicalAttention(nn.Module):
    """H-MHSA: local attention inside grid cells, then global attention to a pooled copy of the map.

    With ``grid_size == 1`` (the last stage) it is plain multi-head self-attention over the whole map.
    """

    def __init__(
            self,
            dim: int,
            head_dim: int,
            grid_size: int = 1,
            pool_ratio: int = 1,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % head_dim:
            raise ValueError(f'dim {dim} is not a multiple of head_dim {head_dim}')
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.grid_size = grid_size

        self.norm = GroupNorm1(dim, **dd)
        self.qkv = nn.Conv2d(dim, dim * 3, 1, **dd)
        if grid_size > 1:
            self.grid_norm = GroupNorm1(dim, **dd)
            self.pool = nn.AvgPool2d(pool_ratio, stride=pool_ratio, ceil_mode=True)
            self.ds_norm = GroupNorm1(dim, **dd)
            self.q = nn.Conv2d(dim, dim, 1, **dd)
            self.kv = nn.Conv2d(dim, dim * 2, 1, **dd)
        else:
            self.grid_norm = self.pool = self.ds_norm = self.q = self.kv = None
        self.proj = nn.Conv2d(dim, dim, 1, **dd)
        self.proj_norm = GroupNorm1(dim, **dd)  # never applied, see the module docstring
        self.proj_drop = nn.Dropout2d(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _exporting_onnx():
            out = self._attend_onnx(x)
        else:
            out = self._attend(x)
        out = self.proj_drop(self.proj(out))
        if self.training:
            out = out + 0. * (self.proj_norm.weight.sum() + self.proj_norm.bias.sum())
        return out

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.grid_norm is None:
            q, k, v = _to_heads(self.qkv(self.norm(x)), 3, self.num_heads, self.head_dim).unbind(0)
            return _from_heads(F.scaled_dot_product_attention(q, k, v), H, W)
        # local step, with a residual from the block input
        qkv = self.qkv(self.norm(x))
        local = self.grid_norm(x + grid_attention(qkv, self.grid_size, self.num_heads))
        # global step: all tokens attend to the pooled map
        q = _to_heads(self.q(local), 1, self.num_heads, self.head_dim)[0]
        k, v = _to_heads(self.kv(self.ds_norm(self.pool(local))), 2, self.num_heads, self.head_dim).unbind(0)
        return local + _from_heads(F.scaled_dot_product_attention(q, k, v), H, W)

    @torch.jit.unused
    def _attend_onnx(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX maps are NCHW: heads are (head_dim, tokens) planes of the projections, reached by reshapes
        B, C, H, W = x.shape
        scale = self.head_dim ** -0.5
        if self.grid_norm is None:
            qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, self.head_dim, H * W)
            return _plane_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], scale).reshape(B, C, H, W)
        local = self.grid_norm(x + _grid_attention_onnx(self.norm(x), self.qkv, self.grid_size, self.num_heads))
        q = self.q(local).reshape(B, self.num_heads, self.head_dim, H * W)
        kv = self.kv(self.ds_norm(self.pool(local))).reshape(B, 2, self.num_heads, self.head_dim, -1)
        return local + _plane_attention(q, kv[:, 0], kv[:, 1], scale).reshape(B, C, H, W)


@register_notrace_module  # its batch slicing depends on tensor sizes; FX keeps it as one call
class InvertedResidual(nn.Module):
    """The block's MLP: norm -> 1x1 expand -> SiLU -> depth-wise kxk -> SiLU -> 1x1 project -> norm.

    Inference on CPU runs it on slices of the batch whose expanded hidden map (4-8x the block's width) is at
    most ``slice_bytes``: that map is written and read four times (expand, SiLU, depth-wise, SiLU), and a
    slice that stays in the cache makes those passes cheap (hat_net_tiny and small at batch 16, 224 x 224:
    about 1.4x the throughput). Every operation is per image, so the result is that of the whole batch.
    The ONNX export writes the same slicing as a loop over the batch (see ``_forward_onnx``).
    """
    slice_bytes: int = 16 << 20
    onnx_slice_bytes: int = 4 << 20  # onnxruntime's best budget on CPU (docs/performance.md)

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            kernel_size: int = 3,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm = GroupNorm1(dim, **dd)
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=False, **dd)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(
            hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim, bias=False, **dd)
        self.act2 = nn.SiLU(inplace=True)
        self.drop1 = nn.Dropout2d(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=False, **dd)
        self.norm_out = GroupNorm1(dim, **dd)
        self.drop2 = nn.Dropout2d(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if _exporting_onnx():
                return self._forward_onnx(x)
            images_per_slice = self._images_per_slice(x)
            if images_per_slice < len(x):
                return torch.cat([self._forward(part) for part in x.split(images_per_slice)])
        return self._forward(x)

    @torch.jit.unused
    def _images_per_slice(self, x: torch.Tensor) -> int:
        # eager CPU inference only: traced / compiled graphs must not depend on the batch size, and in
        # training autograd keeps every hidden map anyway
        if self.training or x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return len(x)
        return _images_per_slice(x, self.fc1.out_channels, x.element_size(), self.slice_bytes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(self.norm(x)))
        x = self.drop1(self.act2(self.conv_dw(x)))
        return self.drop2(self.norm_out(self.fc2(x)))

    @torch.jit.unused
    def _forward_onnx(self, x: torch.Tensor) -> torch.Tensor:
        # inference only (no dropout); the batch and the map size are dynamic in the graph, so the loop is
        # scripted: tracing would unroll it for the example batch
        hidden = _scripted_expand_in_slices()(
            self.norm(x), self.fc1.weight, self.conv_dw.weight, self.fc2.weight,
            self.onnx_slice_bytes, self.conv_dw.padding[0], self.conv_dw.groups)
        return self.norm_out(hidden)


def _images_per_slice(x: torch.Tensor, hidden_channels: int, value_bytes: int, slice_bytes: int) -> int:
    """How many images of ``x`` fit ``slice_bytes`` with their (hidden_channels, H, W) hidden map (at least one)."""
    return max(1, slice_bytes // (x.shape[2] * x.shape[3] * hidden_channels * value_bytes))


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
    images_per_slice = _images_per_slice(x, fc1_weight.shape[0], 4, slice_bytes)  # the export is float32
    outputs: List[torch.Tensor] = []
    for start in range(0, x.shape[0], images_per_slice):
        hidden = F.silu(F.conv2d(x[start:start + images_per_slice], fc1_weight))
        hidden = F.silu(F.conv2d(hidden, dw_weight, padding=dw_padding, groups=dw_groups))
        outputs.append(F.conv2d(hidden, fc2_weight))
    return torch.cat(outputs)


@functools.cache
def _scripted_expand_in_slices():
    # scripted on first use: only the ONNX export needs it (it becomes an ONNX Loop)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated with the exporter it serves
        return torch.jit.script(_expand_in_slices)


class HatBlock(nn.Module):
    def __init__(
            self,
            dim: int,
            head_dim: int,
            grid_size: int = 1,
            pool_ratio: int = 1,
            mlp_ratio: int = 4,
            kernel_size: int = 3,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.attn = HierarchicalAttention(
            dim, head_dim, grid_size=grid_size, pool_ratio=pool_ratio, proj_drop=proj_drop, **dd)
        self.mlp = InvertedResidual(dim, dim * mlp_ratio, kernel_size=kernel_size, drop=proj_drop, **dd)
        # the original applies one DropPath module to both branches (independent masks per call)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        x = x + self.drop_path(self.mlp(x))
        return x


class Stem(nn.Module):
    """Two stride-2 3x3 convolutions: image -> stride 4."""

    def __init__(self, in_chans: int, out_chs: int, mid_chs: int = 16, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, mid_chs, 3, stride=2, padding=1, **dd)
        self.norm1 = GroupNorm1(mid_chs, **dd)
        self.act = nn.SiLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, stride=2, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stem sees the raw images on every path (forward, forward_intermediates, features_only)
        check_image_batch(x, self.in_chans)
        # channels_last from here on: on CPU the depth-wise convolutions and the 1x1 projections are several
        # times faster in NHWC, and the attention can read heads out of the qkv maps without copies
        x = x.contiguous(memory_format=torch.channels_last)
        return self.conv2(self.act(self.norm1(self.conv1(x))))


class Downsample(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, **dd)
        self.norm = GroupNorm1(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class HatStage(nn.Module):
    def __init__(
            self,
            in_chs: int,
            dim: int,
            depth: int,
            head_dim: int,
            grid_size: int,
            pool_ratio: int,
            mlp_ratio: int,
            kernel_size: int,
            downsample: bool = True,
            proj_drop: float = 0.,
            drop_path: Sequence[float] = (),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, dim, **dd) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[HatBlock(
            dim,
            head_dim,
            grid_size=grid_size,
            pool_ratio=pool_ratio,
            mlp_ratio=mlp_ratio,
            kernel_size=kernel_size,
            proj_drop=proj_drop,
            drop_path=drop_path[i],
            **dd,
        ) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class HatNet(nn.Module):
    """HAT-Net backbone + classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: 'avg' or '' (no pooling, forward returns the stride-32 map).
        embed_dims: channels of the four stages.
        head_dim: channels per attention head.
        depths: blocks per stage.
        grid_sizes: side G of the local-attention grid cells per stage (1 = plain global attention).
        pool_ratios: average-pooling factor of the global step per stage.
        mlp_ratios: expansion of the inverted-residual MLP per stage.
        kernel_sizes: depth-wise kernel of the MLP per stage.
        drop_rate: dropout before the classifier (the original uses 0.2).
        proj_drop_rate: channel dropout after attention and inside the MLP.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 320, 512),
            head_dim: int = 64,
            depths: Tuple[int, ...] = (2, 3, 8, 3),
            grid_sizes: Tuple[int, ...] = (8, 7, 7, 1),
            pool_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            mlp_ratios: Tuple[int, ...] = (8, 8, 4, 4),
            kernel_sizes: Tuple[int, ...] = (3, 3, 3, 3),
            stem_chs: int = 16,
            drop_rate: float = 0.2,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.feature_info = []

        self.stem = Stem(in_chans, embed_dims[0], mid_chs=stem_chs, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        prev_dim = embed_dims[0]
        for i in range(num_stages):
            stages.append(HatStage(
                prev_dim,
                embed_dims[i],
                depth=depths[i],
                head_dim=head_dim,
                grid_size=grid_sizes[i],
                pool_ratio=pool_ratios[i],
                mlp_ratio=mlp_ratios[i],
                kernel_size=kernel_sizes[i],
                downsample=i > 0,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                **dd,
            ))
            prev_dim = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev_dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()  # norms and biases are 1-D and excluded by timm's optimizer factory already

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns the outputs of the selected stages.

        Args:
            x: input image batch.
            indices: take the last n stages if int, all if None, the listed stages if a sequence.
            norm: unused, HAT-Net has no final norm.
            stop_early: stop after the last selected stage.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediate features.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)

        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and head) not needed to compute the selected intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Architecture of each variant (the original code's settings); shared by all four.
_COMMON_ARGS = dict(grid_sizes=(8, 7, 7, 1), pool_ratios=(8, 4, 2, 1), mlp_ratios=(8, 8, 4, 4))
VARIANT_ARGS: Dict[str, dict] = {
    'hat_net_tiny': dict(embed_dims=(48, 96, 240, 384), head_dim=48, depths=(2, 2, 6, 3), kernel_sizes=(3, 3, 3, 3)),
    'hat_net_small': dict(embed_dims=(64, 128, 320, 512), head_dim=64, depths=(2, 3, 8, 3), kernel_sizes=(3, 3, 3, 3)),
    'hat_net_medium': dict(
        embed_dims=(64, 128, 320, 512), head_dim=64, depths=(3, 6, 18, 3), kernel_sizes=(5, 3, 5, 3)),
    'hat_net_large': dict(embed_dims=(64, 128, 320, 640), head_dim=64, depths=(3, 8, 27, 3), kernel_sizes=(3, 3, 3, 3)),
}

# Original checkpoint key -> hatnet key. Applied in order, first match wins.
_ORIGINAL_KEY_RULES = [
    (r'^patch_embed\.0\.', 'stem.conv1.'),
    (r'^patch_embed\.1\.', 'stem.norm1.'),
    (r'^patch_embed\.3\.', 'stem.conv2.'),
    (r'^ds(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv1\.0\.', r'stages.\1.blocks.\2.mlp.norm.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv1\.1\.', r'stages.\1.blocks.\2.mlp.fc1.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv2\.0\.', r'stages.\1.blocks.\2.mlp.conv_dw.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv3\.0\.', r'stages.\1.blocks.\2.mlp.fc2.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv3\.1\.', r'stages.\1.blocks.\2.mlp.norm_out.'),
    (r'^blocks\.(\d+)\.(\d+)\.attn\.', r'stages.\1.blocks.\2.attn.'),
    (r'^classifier\.1\.', 'head.'),
]


def _remap_original_key(key: str) -> str:
    for pattern, replacement in _ORIGINAL_KEY_RULES:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key


def remap_original_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the keys of an original HAT-Net state_dict to hatnet's layout (others pass unchanged)."""
    if not any(k.startswith(('patch_embed.', 'blocks.')) for k in state_dict):
        return state_dict
    return {_remap_original_key(k): v for k, v in state_dict.items()}


def _describe_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[dict]:
    """Stage widths, depths and MLP kernel sizes of a hatnet-layout state_dict (None if not HAT-Net)."""
    dims, depths, kernels = [], [], []
    for i in range(4):
        norm = state_dict.get(f'stages.{i}.blocks.0.attn.norm.weight')
        conv_dw = state_dict.get(f'stages.{i}.blocks.0.mlp.conv_dw.weight')
        if norm is None or conv_dw is None:
            return None
        block_ids = {int(m.group(1)) for k in state_dict for m in [re.match(rf'stages\.{i}\.blocks\.(\d+)\.', k)] if m}
        dims.append(norm.shape[0])
        depths.append(len(block_ids))
        kernels.append(conv_dw.shape[-1])
    return dict(embed_dims=tuple(dims), depths=tuple(depths), kernel_sizes=tuple(kernels))


def guess_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the hat_net variant whose architecture matches a (hatnet-layout) state_dict, or None."""
    arch = _describe_architecture(state_dict)
    for name, args in VARIANT_ARGS.items():
        if arch is not None and all(arch[k] == tuple(args[k]) for k in arch):
            return name
    return None


def _check_fits(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise a CheckpointError that names the mismatch if state_dict cannot be loaded into model.

    The classifier and the input-channel dimension of the first conv are left to timm, which adapts them.
    """
    expected = model.state_dict()
    head = ('head.weight', 'head.bias')
    missing = [k for k in expected if k not in state_dict and k not in head]
    unexpected = [k for k in state_dict if k not in expected and k not in head]
    mismatched = [k for k in expected if k in state_dict and k not in head + ('stem.conv1.weight',)
                  and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    if missing:
        details = f'{len(missing)} weights missing, e.g. {missing[:3]}'
    elif unexpected:
        details = f'{len(unexpected)} unexpected weights, e.g. {unexpected[:3]}'
    else:
        key = mismatched[0]
        details = f'{key} has shape {tuple(state_dict[key].shape)}, the model needs {tuple(expected[key].shape)}'
    arch = _describe_architecture(state_dict)
    if arch is None:
        raise CheckpointError(f'not a HAT-Net checkpoint ({details})')
    model_name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    variant = guess_variant(state_dict)
    if variant == model_name:
        raise CheckpointError(f'checkpoint does not fit {model_name}: {details}')
    raise CheckpointError(
        f'checkpoint does not fit {model_name}: it looks like {variant or "an unknown HAT-Net configuration"} '
        f'(stage widths {arch["embed_dims"]}, depths {arch["depths"]}); {details}')


def checkpoint_filter_fn(state_dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an original HAT-Net checkpoint (raw, under 'model'/'state_dict', with or without a 'module.'
    prefix) or a hatnet checkpoint onto ``model``'s layout, and check that it fits."""
    state_dict = remap_original_keys(unwrap_state_dict(state_dict))
    _check_fits(state_dict, model)
    return state_dict


def _create_hat_net(variant: str, pretrained: bool = False, **kwargs) -> HatNet:
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained and overlay.get('file') and overlay.get('state_dict') is None:
        # read local files here rather than in timm: weights_only, safetensors, one clear error per bad file
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=read_state_dict(overlay['file']))
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model_args = dict(_COMMON_ARGS, **VARIANT_ARGS[variant])
    try:
        return build_model_with_cfg(
            HatNet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
            **dict(model_args, **kwargs),
        )
    except URLError as e:
        url = default_cfgs[variant].default.url
        raise CheckpointError(
            f'could not download the {variant} weights from {url} ({e.reason}); download the file and pass '
            f'pretrained_cfg_overlay=dict(file=PATH)') from None


@dataclass
class HatNetPretrainedCfg(PretrainedCfg):
    """timm's pretrained cfg plus the published ImageNet-1k accuracy of the weights."""
    top1: Optional[float] = None


def _cfg(variant_file: str, top1: float) -> HatNetPretrainedCfg:
    return HatNetPretrainedCfg(
        url=f'https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_{variant_file}.pth',
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.conv1', classifier='head',
        top1=top1, description=f'ImageNet-1k, published top-1 {top1}%', origin_url='https://github.com/yun-liu/HAT-Net',
        paper_name='Vision Transformers with Hierarchical Attention', paper_ids='arXiv:2106.03180',
    )


default_cfgs = generate_default_cfgs({
    'hat_net_tiny.in1k': _cfg('Tiny', 79.8),
    'hat_net_small.in1k': _cfg('Small', 82.6),
    'hat_net_medium.in1k': _cfg('Medium', 84.0),
    'hat_net_large.in1k': _cfg('Large', 84.2),
})


@register_model
def hat_net_tiny(pretrained: bool = False, **kwargs) -> HatNet:
    return _create_hat_net('hat_net_tiny', pretrained=pretrained, **kwargs)


@register_model
def hat_net_small(pretrained: bool = False, **kwargs) -> HatNet:
    return _create_hat_net('hat_net_small', pretrained=pretrained, **kwargs)


@register_model
def hat_net_medium(pretrained: bool = False, **kwargs) -> HatNet:
    return _create_hat_net('hat_net_medium', pretrained=pretrained, **kwargs)


@register_model
def hat_net_large(pretrained: bool = False, **kwargs) -> HatNet:
    return _create_hat_net('hat_net_large', pretrained=pretrained, **kwargs)
