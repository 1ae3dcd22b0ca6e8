"""optimize_for_cpu: the batch-sliced CPU inference form gives the plain model's outputs and is safe anywhere."""
import warnings
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from hatnet.bench import compile_model
from hatnet.models import HatNet, optimize_for_cpu
from hatnet.models.hat_net import InvertedResidual
from hatnet.models.runtime import _HAS_FUSED_CONV, SlicedInvertedResidual

# hat_net_tiny at 64 x 64: one image's hidden MLP map is 384 x 16 x 16 float32 = 393216 bytes in stage 0 and
# 768 x 8 x 8 = 196608 bytes in stage 1. A budget of two stage-0 maps slices a batch of 5 into 2 + 2 + 1
# images in stage 0 and 4 + 1 in stage 1; stages 2 and 3 (61440 and 24576 bytes per image) take it whole.
BUDGET = 2 * 393216
EXPECTED_SLICES = {0: [2, 2, 1], 1: [4, 1], 2: [5], 3: [5]}


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('hat_net_tiny', num_classes=10, drop_rate=0., **kwargs)


def _record_slices(model):
    """The input norm of every MLP runs once per slice: per stage, the batch sizes its first block's norm saw.
    (A hook on the norm, not on fc1: hooks on fc1 or conv_dw switch off the fused-SiLU path.)"""
    seen = {i: [] for i in range(len(model.stages))}
    handles = [stage.blocks[0].mlp.norm.register_forward_hook(
        lambda module, inputs, output, i=i: seen[i].append(len(inputs[0]))) for i, stage in enumerate(model.stages)]
    return seen, handles


def test_sliced_inference_equals_the_whole_batch_and_really_slices():
    plain, optimized = _tiny().eval(), optimize_for_cpu(_tiny().eval(), slice_bytes=BUDGET)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen, handles = _record_slices(optimized)
    with torch.inference_mode():
        expected, sliced = plain(images), optimized(images)
    for handle in handles:
        handle.remove()
    assert seen == EXPECTED_SLICES
    torch.testing.assert_close(sliced, expected, rtol=1e-5, atol=1e-5)


def test_training_runs_the_whole_batch():
    plain, optimized = _tiny().train(), optimize_for_cpu(_tiny().train(), slice_bytes=BUDGET)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen, _ = _record_slices(optimized)
    expected, out = plain(images), optimized(images)
    assert seen == {i: [5] for i in range(4)}
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert all(p.grad is not None for p in optimized.parameters())


def _plain_and_sliced_mlp():
    torch.manual_seed(0)
    plain = InvertedResidual(48, 384).eval()
    sliced = optimize_for_cpu(InvertedResidual(48, 384).eval(), slice_bytes=2 * 384 * 20 * 24 * 4)
    sliced.load_state_dict(plain.state_dict())
    x = torch.randn(5, 48, 20, 24).contiguous(memory_format=torch.channels_last)
    return plain, sliced, x


@pytest.mark.skipif(not _HAS_FUSED_CONV, reason="this PyTorch build has no oneDNN fused convolution")
def test_float32_inference_fuses_silu_into_the_convolutions():
    plain, sliced, x = _plain_and_sliced_mlp()
    with torch.inference_mode():
        expected = plain(x)
        with mock.patch.object(F, 'silu', side_effect=AssertionError('separate SiLU pass')):
            out = sliced(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eval_mode_with_grad_mode_on_gives_input_gradients():
    """Saliency maps and adversarial inputs need d(output)/d(input) in eval mode: the fused operator has no
    backward, so grad mode keeps the plain MLP (on slices)."""
    plain, sliced, x = _plain_and_sliced_mlp()
    grads = []
    for mlp in (plain, sliced):
        image = x.clone().requires_grad_()
        mlp(image).square().sum().backward()
        grads.append(image.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_hooks_on_the_mlp_convolutions_still_fire():
    _, sliced, x = _plain_and_sliced_mlp()
    calls = []
    sliced.fc1.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    with torch.inference_mode():
        sliced(x)
    assert calls == [2, 2, 1]


def test_optimize_for_cpu_works_in_place_and_keeps_the_weights():
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize_for_cpu(model) is model
    mlps = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(mlps) == 13 and all(type(m) is SlicedInvertedResidual for m in mlps)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in after.items())
    resnet = timm.create_model('resnet10t')
    classes = [type(m) for m in resnet.modules()]
    assert [type(m) for m in optimize_for_cpu(resnet).modules()] == classes


def _small_hat_net():
    return HatNet(embed_dims=(16, 32, 48, 64), head_dim=16, depths=(1, 1, 1, 1), num_classes=10).eval()


def test_compiled_sliced_model_is_one_graph_for_the_whole_batch():
    torch._dynamo.reset()
    model = optimize_for_cpu(_small_hat_net(), slice_bytes=1)  # eager inference: one image per slice
    counter = CompileCounter()
    run = compile_model(model, backend=counter, fullgraph=True)
    for size in [(120, 120), (150, 200)]:
        images = torch.randn(3, 3, *size)
        with torch.inference_mode():
            torch.testing.assert_close(run(images), model(images), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize('tracer', ['fx', 'script'])
def test_fx_and_torchscript_accept_the_sliced_model(tracer):
    from timm.models import create_feature_extractor

    model = _small_hat_net()
    images = torch.randn(3, 3, 64, 80)
    with torch.inference_mode():
        expected = model(images)
    optimize_for_cpu(model, slice_bytes=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated
        if tracer == 'fx':
            converted = create_feature_extractor(model, return_nodes={'head': 'logits'})
        else:
            converted = torch.jit.script(model)
    with torch.inference_mode():
        out = converted(images)
    torch.testing.assert_close(out['logits'] if tracer == 'fx' else out, expected, rtol=1e-5, atol=1e-5)
