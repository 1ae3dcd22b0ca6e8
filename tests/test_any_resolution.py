"""Any input size >= 32: ragged grid cells are masked, ragged pooling cells average valid pixels only."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from hatnet.errors import InputError
from hatnet.models.hat_net import HierarchicalAttention, grid_attention


def naive_grid_attention(qkv, grid_size, num_heads):
    """Per-cell attention over the valid tokens of each cell only (no padding anywhere), in float64."""
    B, C3, H, W = qkv.shape
    C, head_dim = C3 // 3, C3 // 3 // num_heads
    q, k, v = qkv.double().reshape(B, 3, num_heads, head_dim, H, W).unbind(1)
    out = torch.zeros(B, num_heads, head_dim, H, W, dtype=torch.float64)
    for top in range(0, H, grid_size):
        for left in range(0, W, grid_size):
            cell = (slice(None), slice(None), slice(None), slice(top, top + grid_size), slice(left, left + grid_size))
            qc, kc, vc = (t[cell].flatten(3) for t in (q, k, v))  # B, heads, head_dim, tokens
            attn = (qc.transpose(-2, -1) @ kc * head_dim ** -0.5).softmax(-1)
            out[cell] = (vc @ attn.transpose(-2, -1)).reshape(out[cell].shape)
    return out.reshape(B, C, H, W)


@pytest.mark.parametrize('height, width, grid_size', [(14, 14, 7), (13, 10, 7), (5, 9, 8), (1, 17, 8), (29, 31, 7)])
def test_grid_attention_equals_attention_over_valid_tokens_of_each_cell(height, width, grid_size):
    qkv = torch.randn(2, 3 * 12, height, width, dtype=torch.float64)
    expected = naive_grid_attention(qkv, grid_size, num_heads=3)
    torch.testing.assert_close(grid_attention(qkv, grid_size, 3), expected, rtol=1e-10, atol=1e-10)


def test_valid_tokens_never_see_the_padding():
    """Changing everything outside the valid part of a ragged map leaves the valid outputs untouched."""
    qkv = torch.randn(1, 3 * 8, 16, 16, dtype=torch.float64)
    cropped = grid_attention(qkv[..., :11, :13], 8, 2)
    qkv[..., 11:, :] = 1e3
    qkv[..., :, 13:] = -1e3
    torch.testing.assert_close(grid_attention(qkv, 8, 2)[..., :11, :13][..., :8, :8], cropped[..., :8, :8])


def test_global_pooling_averages_the_valid_pixels_of_ragged_cells():
    attn = HierarchicalAttention(dim=8, head_dim=4, grid_size=8, pool_ratio=4)
    x = torch.randn(1, 8, 10, 7)
    pooled = attn.pool(x)
    assert pooled.shape[-2:] == (3, 2)
    torch.testing.assert_close(pooled[..., 2, 1], x[..., 8:10, 4:7].mean((-2, -1)))
    torch.testing.assert_close(pooled[..., 0, 0], x[..., 0:4, 0:4].mean((-2, -1)))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (97, 250), (480, 640), (512, 512)])
def test_runs_at_any_size(size):
    model = timm.create_model('hat_net_tiny', num_classes=5).eval()
    with torch.inference_mode():
        features = model.forward_features(torch.randn(1, 3, *size))
        logits = model(torch.randn(2, 3, *size))
    assert features.shape[-2:] == tuple(math.ceil(s / 32) for s in size)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_feature_strides_at_800x1333():
    model = timm.create_model('hat_net_tiny', features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.inference_mode():
        features = model(torch.randn(1, 3, 800, 1333))
    assert [tuple(f.shape[-2:]) for f in features] == [(math.ceil(800 / s), math.ceil(1333 / s)) for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in features] == model.feature_info.channels() == [48, 96, 240, 384]


def test_a_ragged_image_is_not_the_zero_padded_image():
    """Masking differs from padding the image: zero pixels beyond the edge would enter attention and pooling."""
    model = timm.create_model('hat_net_tiny').eval()
    x = torch.randn(1, 3, 200, 200)
    with torch.inference_mode():
        ragged = model.forward_features(x)
        padded = model.forward_features(F.pad(x, (0, 24, 0, 24)))[..., :7, :7]
    assert ragged.shape == padded.shape and not torch.allclose(ragged, padded, atol=1e-3)


@pytest.mark.parametrize('shape, message', [
    ((3, 224, 224), '4-D image batch'),
    ((1, 1, 224, 224), 'expected 3 input channels, got 1'),
    ((1, 3, 31, 224), 'too small: 31x224'),
])
def test_bad_inputs_raise_one_clear_error(shape, message):
    model = timm.create_model('hat_net_tiny').eval()
    with pytest.raises(InputError, match=message):
        model(torch.randn(*shape))
    with pytest.raises(InputError, match=message):
        timm.create_model('hat_net_tiny', features_only=True)(torch.randn(*shape))


@pytest.mark.parametrize('size, grid_size', [((14, 14), 7), ((13, 10), 7), ((5, 9), 8)])
def test_attention_maps_are_the_probabilities_of_the_forward(size, grid_size):
    """Applied to the values, the local probabilities give grid_attention (ragged cells included) and the
    global ones the module's output; every valid query's probabilities sum to 1 over valid keys only."""
    torch.manual_seed(0)
    attn = HierarchicalAttention(dim=12, head_dim=4, grid_size=grid_size, pool_ratio=4).eval()
    x = torch.randn(2, 12, *size, dtype=torch.float64)
    attn.double()
    height, width = size
    with torch.no_grad():
        maps = attn.attention_maps(x)
        qkv = attn.qkv(attn.norm(x))
        rows, cols = maps['grid']
        assert maps['map_size'] == size and maps['grid_size'] == grid_size
        assert maps['local'].shape == (2, rows * cols, 3, grid_size ** 2, grid_size ** 2)
        assert maps['pooled_size'] == tuple(math.ceil(s / 4) for s in size)
        local_out = torch.zeros(2, 3, 4, height, width, dtype=torch.float64)
        v = qkv.reshape(2, 3, 3, 4, height, width)[:, 2]  # (B, heads, head_dim, H, W)
        for r in range(height):
            for c in range(width):
                top, left = r // grid_size * grid_size, c // grid_size * grid_size
                cell = (r // grid_size) * cols + c // grid_size
                probs = maps['local'][:, cell, :, (r - top) * grid_size + c - left].reshape(2, 3, grid_size, grid_size)
                valid = probs[..., :height - top, :width - left]
                torch.testing.assert_close(valid.sum((-2, -1)), torch.ones(2, 3, dtype=torch.float64))
                padding = probs.clone()
                padding[..., :height - top, :width - left] = 0
                assert not padding.any()  # keys in the padding get nothing
                local_out[..., r, c] = torch.einsum(
                    'bhyx,bhdyx->bhd', valid, v[..., top:top + grid_size, left:left + grid_size])
        torch.testing.assert_close(local_out.reshape(2, 12, height, width), grid_attention(qkv, grid_size, 3))
        local = attn.grid_norm(x + grid_attention(qkv, grid_size, 3))
        pooled_v = attn.kv(attn.ds_norm(attn.pool(local))).reshape(2, 2, 3, 4, -1)[:, 1]
        mixed = local + torch.einsum('bhnm,bhdm->bhdn', maps['global'], pooled_v).reshape(2, 12, height, width)
        torch.testing.assert_close(attn.proj(mixed), attn(x))


def test_attention_maps_without_grid_are_plain_self_attention():
    torch.manual_seed(0)
    attn = HierarchicalAttention(dim=8, head_dim=4).eval().double()
    x = torch.randn(1, 8, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        maps = attn.attention_maps(x)
        v = attn.qkv(attn.norm(x)).reshape(1, 3, 2, 4, 15)[:, 2]
        mixed = torch.einsum('bhnm,bhdm->bhdn', maps['global'], v).reshape(1, 8, 3, 5)
        torch.testing.assert_close(attn.proj(mixed), attn(x))
    assert set(maps) == {'map_size', 'global'} and maps['global'].shape == (1, 2, 15, 15)
