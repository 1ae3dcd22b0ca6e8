"""Every command-line error is one line and exit status 2, checked before anything runs or is written; outputs
never replace files unless asked; the exported ONNX model refuses what the PyTorch one refuses."""
import errno
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from hatnet.engine.run_dir import LOCK
from test_classification import make_image_folder
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)
from test_segmentation_train import cli as hatnet  # `hatnet ARGS` in this process: (exit code, stdout, stderr)


def one_line_error(*args, progress: bool = False) -> str:
    """Run a command that must fail: exit status 2 and a single line on stderr (returned), after the progress
    bars of a training that started (``progress``)."""
    code, _, err = hatnet(*args)
    lines = err.strip().splitlines()
    assert code == 2 and 'Traceback' not in err and (progress or len(lines) == 1), (code, err)
    assert lines[-1].startswith('error: ') and sum(line.startswith('error: ') for line in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data') / 'colours', per_class=(4, 1), size=32)


TRAIN = ('train', '--model', 'hat_net_tiny', '--img-size', 32, '--batch-size', 4, '--workers', 0, '--iters', 1)


@pytest.fixture(scope='module')
def run(colours, tmp_path_factory):
    """A 3-class classification run (one step): what `hatnet train` writes for a fine-tuned classifier."""
    run_dir = tmp_path_factory.mktemp('runs') / 'colours'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures are made before the autouse one_thread applies
    try:
        code, _, err = hatnet(*TRAIN, '--data', colours, '--out', run_dir)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return run_dir


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize('args, message', [
    (('train', '--data', 'digits', '--opt', 'bogus'), "optimizer 'bogus': Optimizer bogus not found"),
    (('train', '--data', 'digits', '--lr', -1), 'lr must be > 0, got -1.0'),
    (('train', '--data', 'digits', '--lr', 'nan'), 'lr must be > 0, got nan'),
    (('train', '--data', 'digits', '--sched', 'bogus'), "Unknown scheduler 'bogus'"),
    (('train', '--data', 'digits', '--set', 'momentum=2'), 'momentum must be from 0 to 1, got 2.0'),
    (('train', '--data', 'digits', '--num-classes', 1), 'num_classes must be >= 2, got 1'),
    (('train', '--data', 'digits', '--mixup', -0.5), 'mixup must be >= 0, got -0.5'),
    (('det', 'train', '--data', 'MISSING', '--min-size', 0), 'min_size must be >= 32, got 0'),
    (('det', 'train', '--data', 'MISSING', '--multi-scale', '640,0'), 'multi_scale must be >= 32, got 0'),
    (('det', 'train', '--data', 'MISSING', '--set', 'head_norm=bn'), "unknown head_norm 'bn': choose one of none, gn"),
    (('seg', 'train', '--data', 'MISSING', '--crop-size', 8), 'crop_size must be >= 32, got 8'),
    (('seg', 'train', '--data', 'MISSING', '--set', 'ratio_range=[2, 1]'), 'ratio_range must be [low, high], got [2.0, 1.0]'),
    (('seg', 'train', '--data', 'MISSING', '--norm', 'ln'), "norm must be 'gn' or 'bn', got 'ln'"),
    (('seg', 'train', '--data', 'MISSING', '--head', 'psp'), "head must be one of fpn, unet, got 'psp'"),
])
def test_bad_option_values_are_one_line_before_anything_is_read_or_written(tmp_path, args, message):
    line = one_line_error(*args, '--out', tmp_path / 'run', '--iters', 1)
    assert message in line, line
    assert not (tmp_path / 'run').exists()  # (and the data, MISSING, was never looked at)


@pytest.mark.parametrize('args, message', [
    (('eval', '--checkpoint', 'x', '--batch-size', 'many'), "Invalid value for '--batch-size'"),
    (('eval', '--checkpoint', 'x', '--batch-size', 0), "Invalid value for '--batch-size'"),
    (('seg', 'predict', 'a.png', '--checkpoint', 'x', '--short-side', 8), "Invalid value for '--short-side'"),
    (('det', 'predict', 'a.png', '--checkpoint', 'x', '--score-thresh', 2), "Invalid value for '--score-thresh'"),
    (('predict', 'a.png', '--checkpoint', 'x', '--amp', 'fp8'), "Invalid value for '--amp': amp must be 'none', 'bf16'"),
    (('seg', 'eval', '--data', 'x', '--checkpoint', 'x', '--amp', 'int8'), "Invalid value for '--amp'"),
    (('serve', '--checkpoint', 'x', '--amp', 'bfloat16'), "Invalid value for '--amp'"),
    (('no-such-command',), "No such command 'no-such-command'"),
    (('eval',), "Missing option '--checkpoint'"),
])
def test_command_line_usage_errors_are_one_line(args, message):
    assert message in one_line_error(*args)


def test_error_text_with_brackets_is_printed_as_it_is():
    line = one_line_error('seg', 'train', '--data', 'x', '--set', 'ratio_range=[2, 1]', '--iters', 1, '--out', 'y')
    assert line.endswith('got [2.0, 1.0]')


# ---------------------------------------------------------------------------------------------- training
def test_a_single_class_set_and_a_broken_image_stop_training_before_the_run_directory(tmp_path):
    root = make_image_folder(tmp_path / 'one', per_class=(4, 1), size=32)
    for split in ('train', 'val'):
        for name in ('green', 'red'):
            for image in (root / split / name).iterdir():
                image.unlink()
            (root / split / name).rmdir()
    assert 'has one class (blue)' in one_line_error(*TRAIN, '--data', root, '--out', tmp_path / 'run')
    root = make_image_folder(tmp_path / 'broken', per_class=(4, 1), size=32)
    data = (root / 'val' / 'red' / '0.png').read_bytes()
    (root / 'val' / 'red' / '0.png').write_bytes(data[:len(data) // 2])
    assert f'cannot read image {root}/val/red/0.png' in one_line_error(*TRAIN, '--data', root, '--out',
                                                                        tmp_path / 'run')
    assert not (tmp_path / 'run').exists()


def test_a_full_disk_during_training_is_one_line_naming_the_file_and_the_free_space(colours, tmp_path, monkeypatch):
    from hatnet import fileio

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(fileio, '_torch_save', full_disk)
    line = one_line_error(*TRAIN, '--data', colours, '--out', tmp_path / 'run', progress=True)
    assert re.fullmatch(rf'error: cannot write {tmp_path}/run/best\.pth: No space left on device \(.* free there\)',
                        line), line
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['config.yaml', 'log.txt', 'metrics.csv']  # no .tmp


def test_resume_of_a_live_run_and_with_another_batch_size_are_one_line(run, tmp_path):
    proc = __import__('subprocess').Popen(['sleep', '30'])
    try:
        (run / LOCK).write_text(f'{{"pid": {proc.pid}, "host": "{os.uname().nodename}", "started": "now"}}')
        line = one_line_error('train', '--out', run, '--resume', '--iters', 2)
        assert f'{run} is in use by process {proc.pid} on this host' in line and str(run / LOCK) in line
    finally:
        proc.kill()
        proc.wait()
    (run / LOCK).unlink()
    line = one_line_error('train', '--out', run, '--resume', '--iters', 2, '--batch-size', 2)
    assert 'written with batch_size 4, this run has batch_size 2' in line


# ---------------------------------------------------------------------------------------------- outputs
@pytest.fixture
def picture(tmp_path):
    path = tmp_path / 'cat.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_attention_outputs_never_replace_files_unless_asked(run, picture, tmp_path):
    before = (run / 'curves.png').read_bytes()
    line = one_line_error('attention', picture, '--checkpoint', run, '--out', run / 'curves.png', '--overwrite')
    assert line == f'error: {run / "curves.png"} is a file of the training run in {run}; write the output elsewhere'
    assert (run / 'curves.png').read_bytes() == before
    out = tmp_path / 'new [folder]' / 'map [1].png'  # a missing folder, and brackets rich must not eat
    code, stdout, err = hatnet('attention', picture, '--checkpoint', run, '--out', out)
    assert code == 0 and ' '.join(stdout.split()) == f'wrote {out}' and out.is_file(), err
    assert 'exists already (pass --overwrite' in one_line_error('attention', picture, '--checkpoint', run, '--out', out)
    assert hatnet('attention', picture, '--checkpoint', run, '--out', out, '--overwrite')[0] == 0


def test_eval_reports_go_to_the_run_and_elsewhere_only_without_replacing(run, colours, tmp_path):
    assert hatnet('eval', '--checkpoint', run, '--workers', 0, '--json')[0] == 0  # the run's own report
    assert hatnet('eval', '--checkpoint', run, '--workers', 0, '--json')[0] == 0  # refreshed
    assert (run / f'eval-{colours.name}-val' / 'per_class.csv').is_file()
    (tmp_path / 'report').mkdir()
    (tmp_path / 'report' / 'per_class.csv').write_text('mine')
    line = one_line_error('eval', '--checkpoint', run, '--workers', 0, '--out', tmp_path / 'report')
    assert 'per_class.csv exists already' in line and (tmp_path / 'report' / 'per_class.csv').read_text() == 'mine'


def test_export_of_a_run_refuses_small_inputs_in_onnxruntime_too(run, tmp_path):
    """A fine-tuned (3-class) run exports by its directory; the graph refuses inputs under 32 px, as PyTorch does."""
    import onnxruntime as ort

    from hatnet.errors import InputError
    from hatnet.export import OnnxRunner

    onnx = tmp_path / 'colours.onnx'
    code, out, err = hatnet('export', run, '--onnx', onnx, '--check-size', '32,40x56')
    assert code == 0 and 'max |Δ|' in out and onnx.is_file(), err
    runner = OnnxRunner(onnx)
    assert runner(torch.zeros(2, 3, 32, 45)).shape == (2, 3)
    for size in ((31, 31), (1, 1), (200, 31)):
        with pytest.raises(InputError, match=f'image is too small: {size[0]}x{size[1]}, the model needs at least 32x32'):
            runner(torch.zeros(1, 3, *size))
    session = ort.InferenceSession(str(onnx))
    with pytest.raises(Exception, match='input_at_least_32x32'):
        session.run(None, {'images': np.zeros((1, 3, 31, 31), np.float32)})


def test_export_of_a_model_with_a_runs_checkpoint_and_its_outputs(run, tmp_path):
    onnx = tmp_path / 'tiny.onnx'
    onnx.write_text('an earlier export')
    assert 'exists already' in one_line_error('export', 'hat_net_tiny', '--checkpoint', run / 'best.pth', '--onnx', onnx)
    assert 'is a file of the training run' in one_line_error('export', run, '--onnx', run / 'best.pth')
    assert 'give it alone' in one_line_error('export', run, '--checkpoint', run / 'best.pth', '--onnx', tmp_path / 'x.onnx')
    code, _, err = hatnet('export', 'hat_net_tiny', '--checkpoint', run / 'best.pth', '--onnx', onnx, '--overwrite',
                          '--check-size', 32)
    assert code == 0 and onnx.read_bytes()[:2] != b'an', err


def test_bench_checks_its_models_and_outputs_before_it_runs(tmp_path):
    args = ('bench', '--resolutions', 64, '--rounds', 1, '--warmup', 1, '--no-latency')
    line = one_line_error(*args, '--models', 'hat_net_tiny,unknown_net', '--out', tmp_path / 'b')
    assert "unknown model 'unknown_net'" in line and not (tmp_path / 'b').exists()
    (tmp_path / 'file').write_text('x')
    assert 'is a file; give a folder' in one_line_error(*args, '--models', 'hat_net_tiny', '--out', tmp_path / 'file')
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'bench.csv').write_text('earlier results')
    line = one_line_error(*args, '--models', 'hat_net_tiny', '--out', tmp_path / 'b')
    assert 'bench.csv exists already' in line and (tmp_path / 'b' / 'bench.csv').read_text() == 'earlier results'


# ---------------------------------------------------------------------------------------------- seg and det
@pytest.fixture(scope='module')
def seg_run(tmp_path_factory):
    from hatnet.data.segmentation import write_shapes_dataset
    tmp = tmp_path_factory.mktemp('seg')
    data = write_shapes_dataset(tmp / 'shapes', 'folders', num_train=4, num_val=2, size=(32, 40))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = hatnet('seg', 'train', '--data', data, '--layout', 'folders', '--model', 'resnet10t', '--out',
                              tmp / 'run', '--iters', 1, '--batch-size', 2, '--crop-size', 32, '--short-side', 32,
                              '--workers', 0)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return tmp / 'run'


@pytest.fixture(scope='module')
def det_run(tmp_path_factory):
    from detection_shapes import write_shapes_dataset
    tmp = tmp_path_factory.mktemp('det')
    data = write_shapes_dataset(tmp / 'coco', train=3, val=1, size=(40, 48))  # the last image of a split is empty
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = hatnet('det', 'train', '--data', data, '--model', 'resnet10t', '--out', tmp / 'run', '--iters', 1,
                              '--batch-size', 2, '--min-size', 40, '--max-size', 48, '--workers', 0, '--device', 'cpu')
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return tmp / 'run'


def test_seg_predict_checks_every_input_and_output_before_writing(seg_run, picture, tmp_path, monkeypatch):
    thin = tmp_path / 'thin.png'
    Image.new('RGB', (300, 2)).save(thin)
    out = tmp_path / 'masks'
    assert 'thin.png is 300x2' in one_line_error('seg', 'predict', picture, thin, '--checkpoint', seg_run, '--out', out)
    assert not out.exists()  # the good image's outputs were not written either
    Image.new('RGB', (200, 200)).save(tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10000)  # the bomb has more than twice that, the cat less
    assert 'bomb.png: Image size (40000 pixels) exceeds limit of 20000 pixels' in one_line_error(
        'seg', 'predict', picture, tmp_path / 'bomb.png', '--checkpoint', seg_run, '--out', out)
    monkeypatch.undo()
    assert hatnet('seg', 'predict', picture, '--checkpoint', seg_run, '--out', out)[0] == 0
    assert 'cat_mask.png exists already' in one_line_error('seg', 'predict', picture, '--checkpoint', seg_run,
                                                           '--out', out)
    assert hatnet('seg', 'predict', picture, '--checkpoint', seg_run, '--out', out, '--overwrite')[0] == 0


def test_seg_runs_export_to_onnx(seg_run, tmp_path):
    code, out, err = hatnet('export', seg_run, '--onnx', tmp_path / 'seg.onnx', '--check-size', '32,40x48')
    assert code == 0 and out.count('max |Δ|') == 2, err


def test_det_predict_never_replaces_a_runs_files(det_run, tmp_path):
    curves = tmp_path / 'curves.png'  # an input named like a file the run holds
    Image.new('RGB', (48, 40), (90, 90, 90)).save(curves)
    before = (det_run / 'curves.png').read_bytes()
    line = one_line_error('det', 'predict', curves, '--checkpoint', det_run, '--out', det_run, '--overwrite')
    assert 'curves.png is a file of the training run' in line and (det_run / 'curves.png').read_bytes() == before
    # the export of a detection run (tests/test_export_tasks.py checks its numbers) never replaces a file either
    (tmp_path / 'det.onnx').write_bytes(b'mine')
    assert 'exists already' in one_line_error('export', det_run, '--onnx', tmp_path / 'det.onnx')
    assert (tmp_path / 'det.onnx').read_bytes() == b'mine'


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_shapes_commands_write_a_new_folder_only(task, tmp_path):
    out = tmp_path / 'shapes'
    assert hatnet(task, 'shapes', out, '--train', 2, '--val', 1, '--min-size', 40, '--max-size', 48)[0] == 0
    written = sorted(p.relative_to(out) for p in out.rglob('*'))
    assert len([p for p in written if p.suffix in ('.png', '.jpg')]) >= 3
    assert 'already exists' in one_line_error(task, 'shapes', out, '--train', 2)
    assert sorted(p.relative_to(out) for p in out.rglob('*')) == written
    assert 'smaller than --min-size 64' in one_line_error(task, 'shapes', tmp_path / 'new', '--min-size', 64,
                                                           '--max-size', 40)
    assert not (tmp_path / 'new').exists()
