"""HAT-Net under CPU bf16 autocast and in training: the fast forms (bf16 norms, attention as matrix products,
out-of-place SiLU under autograd, SiLU fused into the MLP's convolutions) keep the values and really run."""
import os
import subprocess
import sys
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

from hatnet.models import optimize_for_cpu
from hatnet.models import hat_net
from hatnet.models.hat_net import GroupNorm1, InvertedResidual, SiLU, _attention
from hatnet.models.runtime import _HAS_FUSED_BF16_CONV, IS_X86, SlicedInvertedResidual
from hatnet.reference import reference_model


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('hat_net_tiny', num_classes=10, drop_rate=0., **kwargs)


def _bf16():
    return torch.autocast('cpu', dtype=torch.bfloat16)


@pytest.mark.parametrize('training', [False, True])
def test_no_float32_maps_between_norms_and_convolutions_under_bf16_autocast(training):
    """Every norm writes bf16 and every convolution reads bf16: no whole map is up-cast to float32 by a norm
    and cast back by the next convolution."""
    model = _tiny().train(training)
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, GroupNorm1):
            module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, 'norm out', o.dtype)))
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, 'conv in', i[0].dtype)))
    with _bf16():
        model(torch.randn(2, 3, 64, 80)).float().sum().backward() if training else model(torch.randn(2, 3, 64, 80))
    assert len(seen) > 50
    assert [entry for entry in seen if entry[2] != torch.bfloat16 and entry[0] != 'stem.conv1'] == []


def test_bf16_norm_matches_the_float32_norm():
    norm = GroupNorm1(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 48, 30, 40).contiguous(memory_format=torch.channels_last)
    expected = norm(x)
    for inputs in (x, x.bfloat16()):
        with _bf16():
            out = norm(inputs)
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05)


@pytest.mark.parametrize('masked', [False, True])
def test_bf16_attention_matches_sdpa_and_trains(masked):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 49, 48, generator=generator) for _ in range(3))
    mask = (torch.arange(49) < 40).view(1, 1, 1, 49).expand(6, 1, 1, 49) if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attention(q, k, v, mask), expected, rtol=0, atol=0)  # float32: the fused kernel
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    with mock.patch.object(F, 'scaled_dot_product_attention', side_effect=AssertionError('fused kernel')):
        out = _attention(*low, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.03)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in low)


@pytest.mark.parametrize('amx', [False, True])
def test_bf16_inference_attention_takes_the_fused_kernel_only_on_an_amx_cpu(amx):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 49, 48, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    fused = F.scaled_dot_product_attention
    calls = []
    with mock.patch.object(hat_net, '_CPU_HAS_AMX', amx), \
            mock.patch.object(F, 'scaled_dot_product_attention', lambda *a, **kw: calls.append(1) or fused(*a, **kw)):
        out = _attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        _attention(*(t.bfloat16().requires_grad_() for t in (q, k, v)))  # training: matrix products always
    assert len(calls) == int(amx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.03)


def test_bf16_model_runs_no_fused_attention_kernel_on_cpu():
    model = _tiny().train()
    with mock.patch.object(F, 'scaled_dot_product_attention', side_effect=AssertionError('fused kernel')), _bf16():
        model(torch.randn(2, 3, 64, 80)).float().sum().backward()


def test_silu_is_out_of_place_under_autograd_only():
    act = SiLU(inplace=True)
    x = torch.randn(4, 8, requires_grad=True)
    y = x * 1.  # a non-leaf, as a convolution's output is
    out = act(y)
    assert out.data_ptr() != y.data_ptr()  # no copy of y saved for the backward pass: y itself is
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))))
    with torch.no_grad():
        z = x * 1.
        assert act(z).data_ptr() == z.data_ptr()
        torch.testing.assert_close(z, F.silu(x))


def test_model_uses_the_autograd_aware_silu():
    model = _tiny()
    assert all(type(m) is SiLU for m in model.modules() if isinstance(m, torch.nn.SiLU))


@pytest.mark.skipif(not _HAS_FUSED_BF16_CONV, reason="no oneDNN fused bf16 convolution on this build or CPU")
def test_sliced_bf16_mlp_fuses_silu_and_matches_the_plain_mlp():
    torch.manual_seed(0)
    plain = InvertedResidual(48, 384).eval()
    sliced = optimize_for_cpu(InvertedResidual(48, 384).eval(), slice_bytes=2 * 384 * 20 * 24 * 2)
    sliced.load_state_dict(plain.state_dict())
    assert type(sliced) is SlicedInvertedResidual
    x = torch.randn(5, 48, 20, 24).contiguous(memory_format=torch.channels_last)
    slices = []  # the budget holds two bf16 hidden maps: slices of 2, 2 and 1 images
    sliced.norm.register_forward_hook(lambda module, inputs, output: slices.append(len(inputs[0])))
    with torch.inference_mode():
        expected = plain(x)
        with _bf16(), mock.patch.object(F, 'silu', side_effect=AssertionError('separate SiLU pass')):
            out = sliced(x)
    assert slices == [2, 2, 1]
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.1 * expected.abs().max().item())


_AVX2_ONLY_CHECK = """
import torch
from hatnet.models import optimize_for_cpu
from hatnet.models.hat_net import InvertedResidual
print(torch.ops.mkldnn._is_mkldnn_bf16_supported())
torch.manual_seed(0)
mlp = InvertedResidual(48, 384).eval()
x = torch.randn(3, 48, 20, 24).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    expected = mlp(x)
    optimize_for_cpu(mlp)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mlp(x)
print(out.dtype, ((out.float() - expected).abs().max() / expected.abs().max()).item())
"""


@pytest.mark.skipif(not IS_X86, reason='an x86 instruction set cap')
def test_bf16_inference_form_runs_on_cpus_without_onednn_bf16():
    """An x86 CPU with AVX2 only: oneDNN refuses bf16 convolutions there, so the sliced MLP must not call its
    fused bf16 form. Such a CPU is emulated by capping oneDNN's instruction set in a fresh process."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2')
    result = subprocess.run([sys.executable, '-c', _AVX2_ONLY_CHECK], env=env, capture_output=True, text=True,
                            check=False)  # the stderr goes into the assertion message
    assert result.returncode == 0, result.stderr[-1500:]
    supported, dtype, error = result.stdout.split()
    assert supported == 'False'  # the cap took effect: oneDNN has no bf16 convolution in that process
    assert dtype == 'torch.bfloat16' and float(error) < 0.1


def test_bf16_logits_of_tiny_stay_close_to_float32():
    """The reference fixture's stand-in weights, 16 images: bf16 autocast (CPU inference form) close to float32
    (max |Δ| 0.067 measured with AVX-512-BF16; the bound leaves room for other CPUs' bf16 kernels)."""
    model = reference_model('tiny', weight_seed=0)
    images = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(images)
        optimize_for_cpu(model)
        with _bf16():
            out = model(images)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max().item() < 0.08
    assert (out.float().argmax(1) == expected.argmax(1)).all()
