"""GroupNorm1, HAT-Net's one-group norm: nn.GroupNorm(1, C)'s values and gradients, on any layout and map size,
with only its input kept for the backward pass."""
import pytest
import torch
import torch.nn.functional as F

from hatnet.models.hat_net import GroupNorm1


def _norm_and_inputs(height: int, width: int, channels_last: bool):
    torch.manual_seed(0)
    norm = GroupNorm1(48)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # an offset mean and a spread that make float32 accumulation error visible on large maps
    images = torch.randn(2, 48, height, width) * 3 + 5
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return norm, images.requires_grad_()


@pytest.mark.parametrize('height, width, channels_last', [(20, 24, True), (20, 24, False), (512, 512, True)])
def test_values_and_gradients_are_group_norms_in_float64(height, width, channels_last):
    norm, images = _norm_and_inputs(height, width, channels_last)
    out = norm(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (images, norm.weight, norm.bias), upstream)

    params = [p.detach().double().requires_grad_() for p in (images, norm.weight, norm.bias)]
    expected = F.group_norm(params[0], 1, params[1], params[2], norm.eps)
    expected_grads = torch.autograd.grad(expected, params, upstream.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        # the weight / bias gradients sum over every pixel: compare relative to their size
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5 * expected_grad.abs().max().item())


def test_only_the_input_map_is_kept_for_the_backward_pass():
    norm, images = _norm_and_inputs(56, 56, True)
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        norm(images)
    map_bytes = images.numel() * images.element_size()
    # the input's storage, and per-sample statistics and parameters (no second map, e.g. the normalised one)
    assert map_bytes in saved.values()
    assert sum(saved.values()) < 1.1 * map_bytes
