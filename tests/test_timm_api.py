"""The timm model API and real clients of it (segmentation-models-pytorch, torchvision FPN)."""
import copy
from collections import OrderedDict

import pytest
import timm
import torch
from timm.models._manipulate import group_parameters

from hatnet.models import HatNet


@pytest.fixture(scope='module')
def tiny():
    return timm.create_model('hat_net_tiny', num_classes=10).eval()


def test_create_model_arguments():
    model = timm.create_model('hat_net_small', num_classes=3, in_chans=4, drop_rate=0.3, drop_path_rate=0.2)
    assert isinstance(model, HatNet)
    assert (model.head.out_features, model.stem.conv1.in_channels, model.head_drop.p) == (3, 4, 0.3)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks if hasattr(b.drop_path, 'drop_prob')]
    assert rates == pytest.approx([0.2 * i / 15 for i in range(1, 16)])  # linear over the 16 blocks, first is 0
    unpooled = timm.create_model('hat_net_small', num_classes=0, global_pool='').eval()
    with torch.inference_mode():
        assert unpooled(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_forward_features_head_and_reset_classifier(tiny):
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        features = tiny.forward_features(x)
        pre_logits = tiny.forward_head(features, pre_logits=True)
        logits = tiny.forward_head(features)
    assert features.shape == (2, 384, 3, 3) and pre_logits.shape == (2, 384) and logits.shape == (2, 10)
    torch.testing.assert_close(pre_logits, features.mean((2, 3)))
    model = timm.create_model('hat_net_tiny', num_classes=10).eval()
    model.reset_classifier(0)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), model.forward_features(x).mean((2, 3)))
    model.reset_classifier(4, '')
    assert model.head.out_features == 4 and model.global_pool == ''


def test_features_only_and_forward_intermediates_agree(tiny):
    x = torch.randn(1, 3, 100, 130)
    features = timm.create_model('hat_net_tiny', features_only=True, out_indices=(1, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(state_dict=tiny.state_dict()))
    assert features.feature_info.channels() == [96, 384] and features.feature_info.reduction() == [8, 32]
    with torch.inference_mode():
        final, intermediates = tiny.forward_intermediates(x)
        selected = features.eval()(x)
        torch.testing.assert_close(final, tiny.forward_features(x))
    assert [f.shape[-2:] for f in intermediates] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    torch.testing.assert_close(selected[0], intermediates[1])
    torch.testing.assert_close(selected[1], intermediates[3])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('hat_net_tiny', num_classes=4)
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    torch.manual_seed(1)
    plain = grads()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unused_proj_norm_gets_zero_gradient_and_never_changes_outputs():
    """The original's proj_norm is never applied; it still takes part in training graphs (see hat_net.py)."""
    model = timm.create_model('hat_net_tiny', num_classes=4, drop_rate=0.)
    x = torch.randn(1, 3, 64, 64)
    model.train()
    train_out = model(x)
    train_out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    proj_norm = model.stages[0].blocks[0].attn.proj_norm
    assert torch.count_nonzero(proj_norm.weight.grad) == 0
    model.eval()
    with torch.inference_mode():
        before = model(x)
        torch.testing.assert_close(train_out.detach(), before, rtol=0, atol=0)  # no dropout: same function
        proj_norm.weight.fill_(123.)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_channels_last_weights_train_bit_for_bit_the_same():
    """The trainer converts models to channels_last by default; hat_net computes in NHWC whatever the layout."""
    model = timm.create_model('hat_net_tiny', num_classes=4, drop_rate=0., drop_path_rate=0.).train()
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert converted.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, target = torch.randn(2, 3, 72, 88), torch.tensor([1, 3])  # ragged grid cells in stages 1-3
    for m in (model, converted):
        torch.nn.functional.cross_entropy(m(x), target).backward()
    for (name, a), b in zip(model.named_parameters(), converted.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def test_group_matcher_orders_stem_blocks_and_head(tiny):
    groups = list(group_parameters(tiny, tiny.group_matcher(coarse=False)).values())
    assert len(groups) == 1 + sum(len(s.blocks) for s in tiny.stages) + 1  # stem, one per block, head
    assert groups[0][0].startswith('stem.') and groups[-1] == ['head.weight', 'head.bias']
    # a stage's downsampling goes with its first block, as in timm's ConvNeXt
    assert any('stages.1.downsample.conv.weight' in g and 'stages.1.blocks.0.attn.qkv.weight' in g for g in groups)
    coarse = group_parameters(tiny, tiny.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1


def test_prune_intermediate_layers_keeps_the_selected_features(tiny):
    model = timm.create_model('hat_net_tiny').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        taps = model.forward_intermediates(x, intermediates_only=True)
        take = model.prune_intermediate_layers([1])
        pruned = model.forward_intermediates(x, indices=take, intermediates_only=True)
    assert len(model.stages) == 2 and model.num_features == 96
    torch.testing.assert_close(pruned[0], taps[1])


def test_meta_device_construction_computes_nothing():
    with torch.device('meta'):
        model = timm.create_model('hat_net_medium', features_only=True, drop_path_rate=0.3)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize('architecture', ['Unet', 'FPN'])
def test_segmentation_models_pytorch_encoder(architecture):
    smp = pytest.importorskip('segmentation_models_pytorch')
    model = getattr(smp, architecture)('tu-hat_net_tiny', encoder_weights=None, classes=3).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 96, 128))
    assert out.shape == (1, 3, 96, 128) and torch.isfinite(out).all()


def test_torchvision_feature_pyramid_on_features_only():
    from torchvision.ops import FeaturePyramidNetwork
    backbone = timm.create_model('hat_net_tiny', features_only=True).eval()
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=256).eval()
    with torch.inference_mode():
        pyramid = fpn(OrderedDict((str(i), f) for i, f in enumerate(backbone(torch.randn(1, 3, 160, 224)))))
    assert [tuple(p.shape) for p in pyramid.values()] == [(1, 256, 40, 56), (1, 256, 20, 28), (1, 256, 10, 14),
                                                         (1, 256, 5, 7)]
