""" HAT-Net: Vision Transformers with Hierarchical Attention

Paper: `Vision Transformers with Hierarchical Attention` - https://arxiv.org/abs/2106.03180
    Yun Liu, Yu-Huan Wu, Guolei Sun, Le Zhang, Ajad Chhatkuli, Luc Van Gool.
    Machine Intelligence Research 21, 670-683 (2024).

A four-stage convolutional pyramid (strides 4/8/16/32) whose blocks pair H-MHSA (``HierarchicalAttention``)
with an inverted-residual MLP. Numerically this is the original implementation (github.com/yun-liu/HAT-Net),
whose checkpoints ``checkpoint_filter_fn`` loads; the layout follows timm (stage i owns its downsampling).
Runtime forms live elsewhere: CPU batch slicing in ``hatnet.models.runtime``, export forms in ``hatnet.export``.

Any input resolution: the original needs maps that divide into whole grid cells (sides that are multiples
of 224); here any size >= 32 x 32 works, with the same numbers where the original runs.
* Local step: q/k/v are zero-padded at the bottom/right to whole G x G cells and the padding is masked out
  as keys: exactly attention over the valid part of each ragged edge cell (padded queries are dropped).
* Global step: ``ceil_mode=True`` pooling makes a ragged edge cell one pooled token, the mean of the valid
  pixels it covers (PyTorch does not count out-of-bounds positions without explicit padding).
* Downsampling (3x3, stride 2, padding 1) rounds odd sides up: stage i has ceil(H / 2^(i+2)) rows.

Memory layout: the stem converts the images to channels_last and every stage keeps it (``.contiguous()``
gives NCHW). On CPU the depth-wise and 1x1 convolutions are several times faster in NHWC, q/k/v are strided
views of the projection that ``F.scaled_dot_product_attention`` reads directly, and its output is already
the NHWC map: H-MHSA copies data only to gather and scatter the grid cells.

bf16 (CPU autocast): the norms read and write bf16 maps (statistics in float32 inside PyTorch's kernel)
instead of writing float32 maps that the next convolution casts back, and the attention runs as two matrix
products and a softmax, because PyTorch's fused CPU attention kernel is several times slower in bf16 for these
short sequences, above all in the backward pass; only inference on a CPU with AMX keeps the fused kernel, which
runs its bf16 products on AMX tiles there. float32 runs take neither path (outputs unchanged).

Tracing tools: ``torch.fx`` tracers (timm's and torchvision's ``create_feature_extractor``) keep the input
check and the local step as leaf calls. Under ``torch.compile`` and ``torch.export`` (``is_compiling()``) the
model keeps NCHW and writes reshapes, the edge crop, the ceil-mode pooling and the cell mask in forms whose
sizes the symbolic shape tracer derives without guards on divisibility or on the batch size's layout; with
PyTorch's ``backed_size_oblivious`` (which stops it from asking whether a size is 1) one graph serves every
batch and every size >= 33 (docs/export.md). The eager path is unchanged.

The unused ``proj_norm``: the original attention creates a GroupNorm ``proj_norm`` that its forward never
applies. It is in the released checkpoints and the published parameter counts, so it is kept; in training
it joins the graph with a zero factor, added to ``proj``'s weight (C x C values, where adding it to the
output cost a pass over the map per block), so that every parameter gets a (zero) gradient, as DDP
without ``find_unused_parameters`` and gradient checks expect.
"""
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, get_device_dtype, register_notrace_function, trunc_normal_
from timm.models import PretrainedCfg, build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..errors import InputError
from ..fileio import unwrap_state_dict
from .weights import build_with_weights, check_fits, remap_original_keys

__all__ = ['HatNet', 'checkpoint_filter_fn', 'VARIANT_ARGS', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 32  # smallest image side accepted


@register_notrace_function  # a leaf for timm's feature extraction tracer
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


# leaves for every torch.fx tracer (torchvision's create_feature_extractor too): their Python decides on sizes;
# the check returns nothing, so it is marked as a side effect, which dead-code elimination keeps
torch.fx.wrap('check_image_batch')
torch.fx.node.has_side_effect(check_image_batch)


@torch.jit.unused
def _cpu_autocast_on(x: torch.Tensor) -> bool:
    """CPU autocast is on and x is on the CPU (autocast's own test first: a plain bool under torch.fx tracers)."""
    return torch.is_autocast_enabled('cpu') and x.device.type == 'cpu'


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (the original's norm layer), computed on the channels_last memory order.

    Same statistics (all values of a sample), per-channel affine and state_dict as ``nn.GroupNorm(1, C)``.
    PyTorch's GroupNorm kernel for channels_last inputs accumulates in a way that loses precision as the map
    grows (max |logit error| 1e-4 at 672 x 672 px, against 3e-6 here). A layer norm over the (H, W, C)-ordered
    values of each sample has the same statistics, computed precisely, and takes the per-channel affine
    expanded over (H, W, C): normalisation and affine in one kernel forward and one backward, with only the
    input saved for the backward (a separate affine would save the normalised map as well and pass over the
    map twice more in each direction).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(1, num_channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # compilers write their own reduction; the views of the channels_last form would make symbolic
            # shape tracers guard on the map size and layout
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        if not torch.jit.is_scripting() and _cpu_autocast_on(x):
            # CPU autocast (bf16): the map stays in the low-precision dtype. PyTorch's CPU kernel takes a bf16 map
            # with the float32 affine, accumulates the statistics in float32 and writes bf16, fused with the
            # affine: one pass instead of a float32 output map and the next convolution's cast of it back
            return F.group_norm(x.to(torch.get_autocast_dtype('cpu')), 1, self.weight, self.bias, self.eps)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view of the channels_last map
        sample_shape = x.shape[1:]
        return F.layer_norm(x, sample_shape, self.weight.expand(sample_shape), self.bias.expand(sample_shape),
                            self.eps).permute(0, 3, 1, 2)


class SiLU(nn.SiLU):
    """``nn.SiLU`` that works in place only where autograd does not record it.

    An in-place SiLU inside a training graph makes autograd save a copy of its input for the backward pass
    (a clone: one more pass over the map); out of place, autograd keeps the input it has anyway. With grad
    mode off (inference) it stays in place. Same values either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # grad mode rather than x.requires_grad: a plain bool for torch.fx tracers
        return F.silu(x, inplace=self.inplace and not torch.is_grad_enabled())


def _reshape(x: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """``x.reshape(shape)``; when compiling or exporting, a contiguous copy viewed with ``as_strided``.

    There ``reshape`` decides between a view and a copy from symbolic strides, with guards on the map size
    (divisibility, whether a number of grid cells is 1) that pin sizes or fail ``torch.export``; the copy
    has strides known by construction. Eager runs keep ``reshape``.
    """
    if not torch.compiler.is_compiling():
        return x.reshape(shape)
    strides = [1] * len(shape)
    for i in range(len(shape) - 1, 0, -1):
        strides[i - 1] = strides[i] * shape[i]
    return x.clone(memory_format=torch.contiguous_format).as_strided(shape, strides)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """``x``; when compiling or exporting, copied to NCHW, the layout of the whole compiled graph.

    A convolution whose input may be channels_last or NCHW makes symbolic shape tracers choose its layout
    with a guard on the batch size (whether it is 1), which would fix the batch size.
    """
    return x.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else x


def _to_heads(x: torch.Tensor, parts: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """(B, parts * C, H, W) -> (parts, B, heads, H * W, head_dim), a view when x is channels_last.

    Channels are ordered [part][head][head_dim], the order of the original 1x1 q/k/v projections.
    """
    B, _, H, W = x.shape
    return _reshape(x.permute(0, 2, 3, 1), [B, H * W, parts, num_heads, head_dim]).permute(2, 0, 3, 1, 4)


def _from_heads(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H * W, head_dim) -> (B, heads * head_dim, H, W) in channels_last, a view of SDPA's output."""
    B, num_heads, _, head_dim = x.shape
    return _nchw(_reshape(x.transpose(1, 2), [B, height, width, num_heads * head_dim]).permute(0, 3, 1, 2))


# PyTorch's fused CPU attention runs its bf16 products on AMX tiles where the CPU has them
_CPU_HAS_AMX = torch.cpu._is_amx_tile_supported()


@torch.jit.unused
def _fused_bf16_attention_wins(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """bf16 inference (no gradients) on a CPU with AMX: there the fused kernel's forward is the faster one."""
    return _CPU_HAS_AMX and q.dtype == torch.bfloat16 and not (q.requires_grad or k.requires_grad or v.requires_grad)


@register_notrace_function  # a leaf for timm's tracer: it decides on dtypes and devices
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)``: softmax(q k^T / sqrt(head_dim)) v.

    bf16 / fp16 on CPU (autocast): as two matrix products and a softmax. PyTorch's fused CPU kernel is slower
    there for these short sequences (49-64 keys) by 1.2-1.8x in the forward and 3-6x in forward + backward,
    while the matrix products run on the bf16 GEMMs. The exception is bf16 inference on a CPU with AMX, where
    the fused kernel's forward is 1.2-1.4x faster than the matrix products (its backward is still 3-5x
    slower). float32, other devices and traced / compiled graphs keep the fused kernel (float32 outputs
    unchanged).
    """
    if (q.dtype == torch.bfloat16 or q.dtype == torch.float16) and q.device.type == 'cpu' \
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing()) \
            and (torch.jit.is_scripting() or not _fused_bf16_attention_wins(q, k, v)):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float('-inf'))
        return scores.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


torch.fx.wrap('_attention')  # and for every other torch.fx tracer


def _grid_cells(height: int, width: int, grid_size: int) -> Tuple[int, int]:
    """Rows and columns of grid cells that cover a height x width map (ragged edge cells included)."""
    # ceiling division: the padded sides are then rows * G and cols * G by construction, which symbolic
    # shape tracers (torch.export, torch.compile) need to split them into cells without divisibility guards
    return (height + grid_size - 1) // grid_size, (width + grid_size - 1) // grid_size


def _grid_padding(height: int, width: int, grid_size: int) -> Tuple[int, int]:
    """Rows and columns of zeros that complete the bottom / right edge cells of a grid_size grid."""
    rows, cols = _grid_cells(height, width, grid_size)
    return rows * grid_size - height, cols * grid_size - width


def _cell_key_mask(height: int, width: int, grid_size: int, device: torch.device) -> torch.Tensor:
    """(cells, 1, 1, G * G): True for each cell's keys that lie inside the height x width map (cells row-major)."""
    rows, cols = _grid_cells(height, width, grid_size)
    # the map row and column of every (cell, key), computed in the mask's shape: reshaping the padded map
    # into cells would make symbolic shape tracers guard on the number of cells
    cell = torch.arange(rows * cols, device=device)[:, None]
    key = torch.arange(grid_size * grid_size, device=device)
    row = cell // cols * grid_size + key // grid_size
    col = cell % cols * grid_size + key % grid_size
    return ((row < height) & (col < width))[:, None, None, :]


def _gather_cells(
        qkv: torch.Tensor, grid_size: int, num_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(B, 3 * C, H, W) -> q, k, v per grid cell (B * cells, heads, G * G, head_dim) and the key mask
    (B * cells, 1, 1, G * G) that hides the padding of ragged edge cells, None if the cells fit.

    Traced graphs (torch.compile, torch.jit.trace) pad and mask unconditionally (zero-sized and all true when
    the cells fit) so that one graph serves every input size; eager runs skip both when the cells fit (an
    all-true mask still costs SDPA ~10 % of the model's time).
    """
    B, C3, H, W = qkv.shape
    pad_h, pad_w = _grid_padding(H, W, grid_size)
    rows, cols = _grid_cells(H, W, grid_size)
    # (B, H, W, 3C) is a view of the channels_last map; one copy gathers the cells (after padding, if any)
    # and q, k, v are strided views of it
    qkv = qkv.permute(0, 2, 3, 1)
    key_mask: Optional[torch.Tensor] = None
    # compiling / tracing is tested first: a symbolic pad size must not decide the graph
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or pad_h > 0 or pad_w > 0:
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        key_mask = _cell_key_mask(H, W, grid_size, qkv.device).repeat(B, 1, 1, 1)
    qkv = _reshape(qkv, [B, rows, grid_size, cols, grid_size, C3]).transpose(2, 3)
    qkv = _reshape(qkv, [B * rows * cols, grid_size * grid_size, 3, num_heads, C3 // 3 // num_heads])
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, key_mask


@register_notrace_function
def grid_attention(qkv: torch.Tensor, grid_size: int, num_heads: int) -> torch.Tensor:
    """Local step of H-MHSA: self-attention inside each grid_size x grid_size cell.

    qkv: (B, 3 * C, H, W) -> (B, C, H, W) in channels_last. Ragged edge cells are padded to full size and
    the padding is masked out as keys (see the module docstring).
    """
    B, C3, H, W = qkv.shape
    q, k, v, key_mask = _gather_cells(qkv, grid_size, num_heads)
    x = _attention(q, k, v, key_mask)  # (B * cells, heads, G * G, head_dim)
    # scatter the cells back: (B, rows, cols, G, G, C) -> (B, rows * G, cols * G, C), cropped to H x W
    rows, cols = _grid_cells(H, W, grid_size)
    x = _reshape(x.transpose(1, 2), [B, rows, cols, grid_size, grid_size, C3 // 3]).transpose(2, 3)
    return _nchw(_crop(_reshape(x, [B, rows * grid_size, cols * grid_size, C3 // 3]), H, W).permute(0, 3, 1, 2))


def _crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left height x width part of a (B, H', W', C) map with H' >= height and W' >= width."""
    if torch.compiler.is_compiling():
        # as a negative padding, whose output size is exactly (height, width) for a symbolic shape tracer;
        # a slice would need a guard that the map is at least that large, which the tracer cannot prove
        return F.pad(x, (0, 0, 0, width - x.shape[2], 0, height - x.shape[1]))
    return x[:, :height, :width]  # a view


def _padded_average_pool(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """``ratio`` x ``ratio`` average pooling in ceil mode (ragged edge windows average their valid pixels),
    written as window sums of the zero-padded map divided by the number of valid pixels of each window: the
    same values, without the ceil-mode output-size rule, whose guard (the last window starts inside the
    map) symbolic shape tracers cannot prove. Used when compiling or exporting."""
    pad_h, pad_w = _grid_padding(x.shape[2], x.shape[3], ratio)
    sums = F.avg_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), ratio, ratio, divisor_override=1)
    valid = F.pad(torch.ones_like(x[:1, :1]), (0, pad_w, 0, pad_h))
    return sums / F.avg_pool2d(valid, ratio, ratio, divisor_override=1)


torch.fx.wrap('grid_attention')


def _attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) over the keys allowed by key_mask: the probabilities inside SDPA."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float('-inf'))
    return scores.softmax(-1)


class HierarchicalAttention(nn.Module):
    """H-MHSA, hierarchical multi-head self-attention, in the paper's two steps.

    With X the block input, GN a one-group GroupNorm, Attn(q, k, v) = softmax(q k^T / sqrt(head_dim)) v per
    head, and 1x1 convolutions ``qkv``, ``q``, ``kv`` for the projections:

    * local relationship modelling, attention among the tokens of each G x G grid cell:
      ``L = GN_grid(X + Attn_cell(qkv(GN(X))))``;
    * global relationship modelling, every token of L attends to the merged (average-pooled) tokens:
      ``Y = L + Attn(q(L), kv(P))`` with ``P = GN_ds(AvgPool(L))``;

    and the output is ``proj(Y)``. With ``grid_size == 1`` (the last stage) it is plain multi-head
    self-attention over the whole map: ``proj(Attn(qkv(GN(X))))``.
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
        H, W = x.shape[-2:]
        qkv = self.qkv(self.norm(x))
        if self.grid_norm is None:
            q, k, v = _to_heads(qkv, 3, self.num_heads, self.head_dim).unbind(0)
            out = _from_heads(_attention(q, k, v), H, W)
        else:
            # local step: L = GN_grid(X + Attn_cell(qkv(GN(X))))
            local = self.grid_norm(x + grid_attention(qkv, self.grid_size, self.num_heads))
            # global step: Y = L + Attn(q(L), kv(GN_ds(AvgPool(L))))
            q, k, v = self._global_qkv(local)
            out = local + _from_heads(_attention(q, k, v), H, W)
        if self.training:
            # the unused proj_norm joins the graph through proj's weight (C x C values, not a pass over the map)
            zero = 0. * (self.proj_norm.weight.sum() + self.proj_norm.bias.sum())
            out = F.conv2d(out, self.proj.weight + zero, self.proj.bias)
        else:
            out = self.proj(out)
        return self.proj_drop(out)

    def _global_qkv(self, local: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries from every token of the locally attended map, keys and values from its pooled copy."""
        q = _to_heads(self.q(local), 1, self.num_heads, self.head_dim)[0]
        pooled = _padded_average_pool(local, self.pool.stride) if torch.compiler.is_compiling() else self.pool(local)
        k, v = _to_heads(self.kv(self.ds_norm(pooled)), 2, self.num_heads, self.head_dim).unbind(0)
        return q, k, v

    @torch.jit.ignore
    def attention_maps(self, x: torch.Tensor) -> Dict[str, Any]:
        """Attention probabilities of both steps for the module input x (B, C, H, W), computed like forward
        (same cell gathering and key masks) with an explicit softmax instead of SDPA.

        ``map_size``: (H, W). ``global``: (B, heads, H * W, keys), every token's probabilities over the
        ``pooled_size`` pooled tokens, or over all H * W tokens without a grid. With a grid also ``local``:
        (B, cells, heads, G * G, G * G), in each cell of the ``grid`` (rows, cols) of ``grid_size`` G cells the
        probabilities of its queries over its keys (cells and tokens row-major). Keys in the padding of a
        ragged edge cell get probability 0; the rows of padded queries are meaningless.
        """
        B, _, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        if self.grid_norm is None:
            q, k, _ = _to_heads(qkv, 3, self.num_heads, self.head_dim).unbind(0)
            return {'map_size': (H, W), 'global': _attention_probs(q, k)}
        G, (rows, cols), ratio = self.grid_size, _grid_cells(H, W, self.grid_size), self.pool.stride
        q, k, _, key_mask = _gather_cells(qkv, G, self.num_heads)
        local_probs = _attention_probs(q, k, key_mask).reshape(B, rows * cols, self.num_heads, G * G, G * G)
        q, k, _ = self._global_qkv(self.grid_norm(x + grid_attention(qkv, G, self.num_heads)))
        return {'map_size': (H, W), 'grid_size': G, 'grid': (rows, cols), 'local': local_probs,
                'global': _attention_probs(q, k), 'pooled_size': (-(-H // ratio), -(-W // ratio))}


class InvertedResidual(nn.Module):
    """The block's MLP: norm -> 1x1 expand -> SiLU -> depth-wise kxk -> SiLU -> 1x1 project -> norm."""

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
        self.act1 = SiLU(inplace=True)
        self.conv_dw = nn.Conv2d(
            hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim, bias=False, **dd)
        self.act2 = SiLU(inplace=True)
        self.drop1 = nn.Dropout2d(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=False, **dd)
        self.norm_out = GroupNorm1(dim, **dd)
        self.drop2 = nn.Dropout2d(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(self.norm(x)))
        x = self.drop1(self.act2(self.conv_dw(x)))
        return self.drop2(self.norm_out(self.fc2(x)))


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
        self.act = SiLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, stride=2, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stem sees the raw images on every path (forward, forward_intermediates, features_only)
        check_image_batch(x, self.in_chans)
        # channels_last from here on: on CPU the depth-wise convolutions and the 1x1 projections are several
        # times faster in NHWC, and the attention can read heads out of the qkv maps without copies
        if not torch.compiler.is_compiling():  # compiled graphs stay NCHW (see _nchw); compilers pick layouts
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


def checkpoint_filter_fn(state_dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an original HAT-Net checkpoint (raw, under 'model'/'state_dict', with or without a 'module.'
    prefix) or a hatnet checkpoint onto ``model``'s layout, and check that it fits.

    Only the classifier and, for other input channels, the first conv may differ: timm adapts those.
    """
    state_dict = remap_original_keys(unwrap_state_dict(state_dict))
    adaptable = ('head.weight', 'head.bias') + (('stem.conv1.weight',) if model.in_chans != 3 else ())
    check_fits(state_dict, model, adaptable=adaptable)
    return state_dict


def _create_hat_net(variant: str, pretrained: bool = False, **kwargs) -> HatNet:
    feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop('out_indices', (0, 1, 2, 3)))
    build = partial(build_model_with_cfg, HatNet, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg)
    model_args = dict(_COMMON_ARGS, **VARIANT_ARGS[variant])
    return build_with_weights(build, variant, pretrained, **dict(model_args, **kwargs))


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
