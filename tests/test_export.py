"""ONNX export: onnxruntime matches PyTorch on the reference fixture and at sizes that are not multiples of 224."""
import os
import stat

import pytest
import torch
from typer.testing import CliRunner

from hatnet.cli import app
from hatnet.export import OnnxRunner, export_onnx
from hatnet.models import create
from hatnet.export.hat_net_onnx import grid_attention_onnx
from hatnet.errors import HatNetError
from hatnet.models import HatNet, optimize_for_cpu
from hatnet.models.hat_net import GroupNorm1, grid_attention
from hatnet.reference import official_reference, reference_input, reference_state_dict

TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """hat_net_tiny with the fixture's stand-in weights, saved as an original .pth and exported by the CLI."""
    case = next(c for c in official_reference()['cases'] if c['variant'] == 'tiny')
    folder = tmp_path_factory.mktemp('onnx')
    checkpoint, onnx = folder / 'HAT-Net_Tiny.pth', folder / 'tiny.onnx'
    torch.save(reference_state_dict('tiny', case['weight_seed']), checkpoint)
    result = CliRunner().invoke(app, ['export', 'hat_net_tiny', '--checkpoint', str(checkpoint), '--onnx', str(onnx),
                                      '--check-size', '250x333'])
    assert result.exit_code == 0, result.output
    return case, checkpoint, onnx, result.output


def test_export_matches_reference_fixture(exported):
    case, _, onnx, _ = exported
    logits = OnnxRunner(onnx)(reference_input(case['input_shape'], case['input_seed']))
    expected = torch.tensor(case['logits'], dtype=torch.float64)
    assert (logits.double() - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize('shape', [(3, 3, 250, 333), (1, 3, 97, 65), (2, 3, 32, 40)])
def test_export_dynamic_sizes_match_pytorch(exported, shape):
    _, checkpoint, onnx, _ = exported
    model = create('hat_net_tiny', checkpoint).eval()
    images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images)
    logits = OnnxRunner(onnx)(images)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOLERANCE


def test_export_cli_reports_the_check(exported):
    _, _, onnx, output = exported
    assert 'at 2x250x333: max |Δ|' in output
    diff = float(output.split('max |Δ|')[1].split()[0])
    assert diff <= TOLERANCE
    assert onnx.stat().st_size > 40e6  # 12.7 M float32 weights are in the file
    assert not list(onnx.parent.glob('.tiny.onnx.*'))  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(onnx.stat().st_mode) == 0o666 & ~umask  # like any file the user creates


def test_export_runs_each_mlp_as_a_loop_over_image_slices(exported):
    """At 112 x 112 the 4 MiB slices hold 3 images in the first stage, 6 in the second: 7 images leave ragged ones."""
    import onnx

    _, checkpoint, path, _ = exported
    model = create('hat_net_tiny', checkpoint).eval()
    graph = onnx.load(path).graph
    loops = [node for node in graph.node if node.op_type == 'Loop']
    assert len(loops) == sum(len(stage.blocks) for stage in model.stages)
    for loop in loops:
        body = next(attr.g for attr in loop.attribute if attr.name == 'body')
        # onnxruntime blocks a convolution's layout only if its weight is an initializer of the loop body
        assert {init.name.split('.')[-2] for init in body.initializer} == {'fc1', 'conv_dw', 'fc2'}
    assert not any(init.name.endswith('mlp.fc1.weight') for init in graph.initializer)

    images = torch.randn(7, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(images)
    assert (OnnxRunner(path)(images) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize('size', [(64, 80), (512, 512)])
def test_exported_group_norm_matches_float64_on_small_and_large_maps(tmp_path, size):
    """onnxruntime's fast norm (small maps) would be off by about 4e-3 on 48 x 512 x 512 values."""
    norm = GroupNorm1(48).eval()
    norm.in_chans = 48  # export_onnx builds its example input from it
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    images = torch.randn(2, 48, *size, generator=torch.Generator().manual_seed(0)) * 3 + 5
    expected = torch.nn.functional.group_norm(images.double(), 1, norm.weight.double(), norm.bias.double(), norm.eps)
    path = export_onnx(norm, tmp_path / 'norm.onnx', example_size=(64, 80))
    assert (OnnxRunner(path)(images).double() - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize('size, grid_size, num_heads', [((14, 14), 7, 2), ((23, 17), 8, 1), ((9, 30), 7, 5)])
def test_local_step_written_for_onnx_equals_the_eager_one(size, grid_size, num_heads):
    """The export's local step (padded before projecting, separate q/k/v, cells in NHWC) is grid_attention."""
    generator = torch.Generator().manual_seed(0)
    dim = 16 * num_heads
    qkv_proj = torch.nn.Conv2d(dim, 3 * dim, 1)
    torch.nn.init.normal_(qkv_proj.bias, generator=generator)  # padded positions project to the bias
    normed = torch.randn(2, dim, *size, generator=generator)
    with torch.no_grad():
        expected = grid_attention(qkv_proj(normed), grid_size, num_heads)
        written = grid_attention_onnx(normed, qkv_proj, grid_size, num_heads)
    assert written.shape == expected.shape == normed.shape
    assert (written - expected).abs().max().item() <= 1e-5


def test_export_leaves_the_model_untouched(tmp_path):
    """The export traces a copy in its ONNX forms: the user's model keeps its modules, mode and outputs."""
    model = optimize_for_cpu(HatNet(embed_dims=(16, 32, 48, 64), head_dim=16, depths=(1, 1, 1, 1), num_classes=3))
    classes = [type(m) for m in model.modules()]
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model.eval()(images)
    model.train()
    path = export_onnx(model, tmp_path / 'small.onnx')
    assert [type(m) for m in model.modules()] == classes and model.training
    with torch.inference_mode():
        assert torch.equal(model.eval()(images), expected)
    assert (OnnxRunner(path)(images) - expected).abs().max().item() <= TOLERANCE


def test_export_rejects_old_opset(tmp_path):
    model = create('hat_net_tiny').eval()
    with pytest.raises(HatNetError, match='opset 16'):
        export_onnx(model, tmp_path / 'x.onnx', opset=16)
    assert not (tmp_path / 'x.onnx').exists()


@pytest.mark.parametrize('args, message', [
    (['export', 'hat_net_nope', '--onnx', 'x.onnx'], 'unknown model'),
    (['export', 'hat_net_tiny', '--checkpoint', 'missing.pth', '--onnx', 'x.onnx'], 'not found'),
])
def test_export_cli_bad_input_is_one_line(tmp_path, args, message, capsys):
    from hatnet.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main([arg.replace('x.onnx', str(tmp_path / 'x.onnx')) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not (tmp_path / 'x.onnx').exists()
