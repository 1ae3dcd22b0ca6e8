"""The one model factory: strict weights for every model, classifier adaptation, features_only, frozen stages."""
import pytest
import timm
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from hatnet.errors import CheckpointError, HatNetError
from hatnet.models.factory import create
from hatnet.reference import reference_input, reference_state_dict


@pytest.fixture(scope='module')
def original_tiny():
    return reference_state_dict('tiny', weight_seed=0)


@pytest.fixture(scope='module')
def resnet_weights():
    torch.manual_seed(0)
    return timm.create_model('resnet10t', num_classes=10).state_dict()


def test_original_checkpoint_loads_with_its_classifier(tmp_path, original_tiny):
    torch.save({'model': original_tiny}, tmp_path / 'HAT-Net_Tiny.pth')
    model = create('hat_net_tiny', tmp_path / 'HAT-Net_Tiny.pth').eval()
    reference = timm.create_model('hat_net_tiny', pretrained=True,
                                  pretrained_cfg_overlay=dict(state_dict=original_tiny)).eval()
    image = reference_input((1, 3, 64, 64), input_seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(model(image), reference(image), rtol=0, atol=0)


def test_another_class_count_gets_a_fresh_classifier_and_keeps_the_rest(original_tiny):
    model = create('hat_net_tiny', original_tiny, num_classes=5)
    assert model.head.out_features == 5
    torch.testing.assert_close(model.stages[3].blocks[2].attn.proj.weight,
                               original_tiny['blocks.3.2.attn.proj.weight'])


def test_features_only_loads_the_backbone_strictly(original_tiny):
    body = create('hat_net_tiny', original_tiny, features_only=True, out_indices=(1, 2, 3))
    assert body.feature_info.reduction() == [8, 16, 32]
    torch.testing.assert_close(body.stages_2.blocks[0].mlp.fc1.weight, original_tiny['blocks.2.0.conv.conv1.1.weight'])


@pytest.mark.parametrize('features_only', [False, True])
def test_any_timm_model_refuses_weights_that_do_not_fit(resnet_weights, original_tiny, features_only):
    broken = {k: v for k, v in resnet_weights.items() if k != 'layer3.0.conv1.weight'}
    with pytest.raises(CheckpointError, match='layer3.0.conv1.weight'):
        create('resnet10t', broken, features_only=features_only)
    with pytest.raises(CheckpointError):
        create('resnet10t', original_tiny, features_only=features_only)
    # the same file without the damage loads, whatever the classifier size
    body = create('resnet10t', resnet_weights, features_only=features_only)
    assert torch.equal(body.layer3[0].conv1.weight, resnet_weights['layer3.0.conv1.weight'])


def test_hat_net_weights_of_another_variant_are_named(original_tiny):
    with pytest.raises(CheckpointError, match='looks like hat_net_tiny'):
        create('hat_net_small', original_tiny, features_only=True)


@pytest.mark.parametrize('features_only', [False, True])
def test_frozen_stages_freeze_stem_and_first_stages(features_only):
    model = create('hat_net_tiny', features_only=features_only, frozen_stages=2)
    early = ('stem', 'stages.0.', 'stages.1.', 'stages_0.', 'stages_1.')  # features_only flattens 'stages.0'
    for name, param in model.named_parameters():
        assert param.requires_grad != name.startswith(early), name
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(name.startswith(('stages.2.', 'stages_2.')) for name in trainable)


def test_frozen_stages_freeze_batch_norm_statistics():
    model = create('resnet10t', features_only=True, frozen_stages=1)
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert not isinstance(model.layer2[0].bn1, FrozenBatchNorm2d)
    assert model.layer2[0].conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    with pytest.raises(HatNetError, match='cannot freeze 9 stages'):
        create('resnet10t', frozen_stages=9)


def test_segmentation_run_is_not_backbone_weights(tmp_path):
    torch.save(dict(format='hatnet-run', task='segmentation', model={'backbone.x': torch.zeros(1)}), tmp_path / 'r.pth')
    with pytest.raises(CheckpointError, match='is a segmentation run'):
        create('hat_net_tiny', tmp_path / 'r.pth', features_only=True)


def test_unknown_model_is_one_error():
    with pytest.raises(HatNetError, match="unknown model 'hat_net_huge'"):
        create('hat_net_huge')
