"""Loading original HAT-Net checkpoints and hatnet safetensors, and the errors for files that do not fit."""
import pytest
import timm
import torch
from typer.testing import CliRunner

from hatnet.cli import app
from hatnet.errors import CheckpointError
from hatnet.reference import reference_input, reference_state_dict


@pytest.fixture(scope='module')
def original_tiny():
    return reference_state_dict('tiny', weight_seed=0)


def _load(path, name='hat_net_tiny', **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _logits(model, size=64):
    with torch.inference_mode():
        return model(reference_input((1, 3, size, size), input_seed=5))


@pytest.mark.parametrize('layout', ['raw', 'model', 'state_dict', 'module_prefix'])
def test_original_checkpoint_layouts_load_identically(tmp_path, original_tiny, layout):
    checkpoint = {
        'raw': original_tiny,
        'model': {'model': original_tiny, 'epoch': torch.tensor(300)},
        'state_dict': {'state_dict': original_tiny},
        'module_prefix': {'model': {f'module.{k}': v for k, v in original_tiny.items()}},
    }[layout]
    torch.save(checkpoint, tmp_path / 'HAT-Net_Tiny.pth')
    model = _load(tmp_path / 'HAT-Net_Tiny.pth')
    assert torch.equal(model.stem.conv1.weight, original_tiny['patch_embed.0.weight'])
    assert torch.equal(model.stages[2].downsample.norm.bias, original_tiny['ds3.norm.bias'])
    assert torch.equal(model.stages[1].blocks[1].mlp.conv_dw.weight, original_tiny['blocks.1.1.conv.conv2.0.weight'])
    assert torch.equal(model.head.weight, original_tiny['classifier.1.weight'])


def test_convert_writes_safetensors_that_load_to_the_same_model(tmp_path, original_tiny):
    torch.save({'model': original_tiny}, tmp_path / 'HAT-Net_Tiny.pth')
    result = CliRunner().invoke(app, ['convert', str(tmp_path / 'HAT-Net_Tiny.pth'), str(tmp_path / 'tiny.safetensors')])
    assert result.exit_code == 0, result.output
    assert 'hat_net_tiny' in result.output
    from_pth, from_safetensors = _load(tmp_path / 'HAT-Net_Tiny.pth'), _load(tmp_path / 'tiny.safetensors')
    torch.testing.assert_close(_logits(from_safetensors), _logits(from_pth), rtol=0, atol=0)

    again = CliRunner().invoke(app, ['convert', str(tmp_path / 'HAT-Net_Tiny.pth'), str(tmp_path / 'tiny.safetensors')])
    assert again.exit_code != 0 and isinstance(again.exception, CheckpointError)
    assert 'already exists' in str(again.exception)


def test_fine_tuning_adapts_head_and_input_channels(tmp_path, original_tiny):
    torch.save(original_tiny, tmp_path / 'tiny.pth')
    model = _load(tmp_path / 'tiny.pth', num_classes=7, in_chans=1)
    assert model.head.out_features == 7
    # timm folds the RGB filters of the first conv into one channel
    torch.testing.assert_close(model.stem.conv1.weight, original_tiny['patch_embed.0.weight'].sum(1, keepdim=True))
    assert torch.equal(model.stages[3].blocks[2].attn.qkv.weight, original_tiny['blocks.3.2.attn.qkv.weight'])


def test_checkpoint_of_another_variant_names_the_variant(tmp_path):
    torch.save({'model': reference_state_dict('small', 0)}, tmp_path / 'HAT-Net_Small.pth')
    with pytest.raises(CheckpointError, match='does not fit hat_net_tiny: it looks like hat_net_small'):
        _load(tmp_path / 'HAT-Net_Small.pth')


def test_missing_and_unexpected_weights_are_named(tmp_path, original_tiny):
    incomplete = {k: v for k, v in original_tiny.items() if k != 'blocks.2.3.attn.kv.weight'}
    torch.save(incomplete, tmp_path / 'incomplete.pth')
    with pytest.raises(CheckpointError, match=r"1 weights missing, e.g. \['stages.2.blocks.3.attn.kv.weight'\]"):
        _load(tmp_path / 'incomplete.pth')
    torch.save(dict(original_tiny, extra=torch.zeros(1)), tmp_path / 'extra.pth')
    with pytest.raises(CheckpointError, match=r"unexpected weights, e.g. \['extra'\]"):
        _load(tmp_path / 'extra.pth')


def test_non_hat_net_weights_are_rejected(tmp_path):
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    with pytest.raises(CheckpointError, match='not a HAT-Net checkpoint'):
        _load(tmp_path / 'resnet18.pth')


@pytest.mark.parametrize('content, message', [
    (b'not a checkpoint at all', 'is not a PyTorch checkpoint'),
    ('truncated', 'is corrupt or truncated'),
    ('pickled_object', 'other than tensors'),
    ('not_a_state_dict', 'is not a state_dict'),
])
def test_bad_files_raise_one_clear_error(tmp_path, original_tiny, content, message):
    path = tmp_path / 'weights.pth'
    if content == 'truncated':
        torch.save(original_tiny, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == 'pickled_object':
        torch.save({'model': CheckpointError('an arbitrary Python object')}, path)
    elif content == 'not_a_state_dict':
        torch.save({'epochs': 300}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_missing_file_and_corrupt_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        _load(tmp_path / 'nowhere.pth')
    (tmp_path / 'broken.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    with pytest.raises(CheckpointError, match='not a valid safetensors file'):
        _load(tmp_path / 'broken.safetensors')


def test_pretrained_cfgs_describe_the_release():
    for name, size, top1 in [('hat_net_tiny', 'Tiny', 79.8), ('hat_net_small', 'Small', 82.6),
                             ('hat_net_medium', 'Medium', 84.0), ('hat_net_large', 'Large', 84.2)]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == f'https://github.com/yun-liu/HAT-Net/releases/download/v2.0/HAT-Net_{size}.pth'
        assert (cfg.input_size, cfg.crop_pct, cfg.top1) == ((3, 224, 224), 0.875, top1)
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        assert timm.create_model(name, device='meta').pretrained_cfg['top1'] == top1


def test_unreachable_release_url_says_what_to_do(monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError('no network')
    monkeypatch.setattr('timm.models._builder.load_state_dict_from_url', offline)
    with pytest.raises(CheckpointError, match=r'could not download the hat_net_tiny weights .*file=PATH'):
        timm.create_model('hat_net_tiny', pretrained=True)
