"""Semantic FPN and the U-Net decoder: shapes at any input size, backbones from timm, ImageNet initialisation
from checkpoint files."""
import pytest
import timm
import torch

from hatnet.fileio import save_safetensors_atomic
from hatnet.errors import CheckpointError, HatNetError
from hatnet.models.semantic_fpn import SemanticFPN
from hatnet.models.unet import UNetDecoder
from hatnet.reference import reference_model, reference_state_dict


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # small models and images: one intra-op thread avoids thread hand-off costs on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def hat_fpn():
    torch.manual_seed(0)
    return SemanticFPN('hat_net_tiny', num_classes=5)


@pytest.fixture(scope='module')
def hat_unet():
    torch.manual_seed(0)
    return UNetDecoder('hat_net_tiny', num_classes=5)


@pytest.fixture(params=['fpn', 'unet'])
def segmenter(request, hat_fpn, hat_unet):
    return dict(fpn=hat_fpn, unet=hat_unet)[request.param]


@pytest.mark.parametrize('size', [(64, 64), (97, 131), (32, 45)])
def test_logits_have_the_input_size(segmenter, size):
    segmenter.eval()
    with torch.no_grad():
        assert segmenter(torch.randn(2, 3, *size)).shape == (2, 5, *size)


def test_head_structure(hat_fpn):
    assert hat_fpn.feature_indices == [0, 1, 2, 3]
    # one conv for the stride-4 level, then one conv + 2x upsampling per halving of the stride
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) for head in hat_fpn.scale_heads]
    ups = [sum(isinstance(m, torch.nn.Upsample) for m in head.modules()) for head in hat_fpn.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]
    assert hat_fpn.fpn.layer_blocks[0][0].out_channels == 256 and hat_fpn.classifier.in_channels == 128
    assert isinstance(hat_fpn.scale_heads[0][0][1], torch.nn.GroupNorm)


def test_unet_decoder_structure(hat_unet):
    """Blocks at strides 4, 8, 16, each over its backbone level (48, 96, 240 channels for Tiny) concatenated with
    the coarser decoded map (the stride-32 block's input is the backbone's last map, 384 channels)."""
    assert hat_unet.feature_indices == [0, 1, 2, 3]
    assert [block[0][0].in_channels for block in hat_unet.blocks] == [48 + 128, 96 + 256, 240 + 384]
    assert [block[1][0].out_channels for block in hat_unet.blocks] == [64, 128, 256]
    assert isinstance(hat_unet.blocks[0][0][1], torch.nn.GroupNorm) and hat_unet.classifier.in_channels == 64
    assert isinstance(UNetDecoder('resnet10t', 3, norm='bn').blocks[2][1][1], torch.nn.BatchNorm2d)


def test_every_parameter_gets_a_gradient(segmenter):
    """DistributedDataParallel without find_unused_parameters needs this."""
    segmenter.train()
    segmenter.zero_grad()
    torch.nn.functional.cross_entropy(segmenter(torch.randn(2, 3, 48, 48)), torch.randint(0, 5, (2, 48, 48))).backward()
    assert [n for n, p in segmenter.named_parameters() if p.grad is None] == []


def test_other_timm_backbones_use_their_stride_4_to_32_features():
    model = SemanticFPN('resnet10t', num_classes=3, norm='bn')
    assert model.feature_indices == [1, 2, 3, 4]  # resnet's stride-2 feature is skipped
    assert isinstance(model.scale_heads[3][0][1], torch.nn.BatchNorm2d)
    assert model(torch.randn(2, 3, 50, 70)).shape == (2, 3, 50, 70)


def test_backbone_without_stride_4_features_is_rejected():
    with pytest.raises(HatNetError, match='stride'):
        SemanticFPN('vit_tiny_patch16_224', num_classes=3)
    with pytest.raises(HatNetError, match="unknown model 'no_such_model'"):
        SemanticFPN('no_such_model', num_classes=3)


def test_backbone_from_an_original_hat_net_checkpoint(tmp_path):
    path = tmp_path / 'HAT-Net_Tiny.pth'
    torch.save({'model': reference_state_dict('tiny', weight_seed=3)}, path)
    model = SemanticFPN('hat_net_tiny', num_classes=4, pretrained=path).eval()
    reference = reference_model('tiny', weight_seed=3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone(x), reference.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(ours, theirs)


def test_backbone_from_our_safetensors_and_timm_checkpoints(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model('hat_net_tiny').eval()
    save_safetensors_atomic(classifier.state_dict(), tmp_path / 'tiny.safetensors')
    model = SemanticFPN('hat_net_tiny', num_classes=4, pretrained=tmp_path / 'tiny.safetensors').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(model.backbone(x)[-1], expected[-1])

    resnet = timm.create_model('resnet10t', num_classes=10)  # a fine-tuned classifier: its head is not used
    torch.save(resnet.state_dict(), tmp_path / 'resnet10t.pth')
    model = SemanticFPN('resnet10t', num_classes=4, pretrained=tmp_path / 'resnet10t.pth')
    torch.testing.assert_close(model.backbone.conv1[0].weight, resnet.conv1[0].weight)


def test_checkpoint_of_another_model_is_one_clear_error(tmp_path):
    torch.save(timm.create_model('resnet10t').state_dict(), tmp_path / 'resnet.pth')
    with pytest.raises(CheckpointError, match='not a HAT-Net checkpoint'):
        SemanticFPN('hat_net_tiny', num_classes=4, pretrained=tmp_path / 'resnet.pth')
    torch.save(reference_state_dict('tiny', weight_seed=0), tmp_path / 'hat.pth')
    with pytest.raises(CheckpointError, match=r'hat\.pth does not fit resnet10t'):
        SemanticFPN('resnet10t', num_classes=4, pretrained=tmp_path / 'hat.pth')
    (tmp_path / 'broken.pth').write_bytes(b'PK\x03\x04garbage')
    with pytest.raises(CheckpointError, match='broken.pth'):
        SemanticFPN('hat_net_tiny', num_classes=4, pretrained=tmp_path / 'broken.pth')
