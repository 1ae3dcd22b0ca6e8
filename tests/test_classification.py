"""Classification end to end through the CLI: train, resume, eval, predict, attention, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from hatnet.cli import main
from hatnet.data.classification import DigitsDataset
from hatnet.models.hat_net import grid_attention
from hatnet.reference import reference_state_dict
from hatnet.tasks.classification import (
    ClassificationTask, confusion_matrix, per_class_accuracy, summarize)
from hatnet.tasks.attention import attention_probabilities
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)

COLOURS = {'blue': (40, 60, 220), 'green': (40, 200, 60), 'red': (220, 40, 40)}


def make_image_folder(root: Path, per_class=(12, 4), size=40, seed=0):
    """train/ and val/ with one folder per colour: noisy images of a coloured square on a grey background."""
    rng = np.random.default_rng(seed)
    for split, count in zip(('train', 'val'), per_class):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.normal(128, 30, (size, size, 3))
                top, left = rng.integers(0, size // 2, 2)
                pixels[top:top + size // 2, left:left + size // 2] = colour
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


def hatnet(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code or 0


TRAIN = ('train', '--model', 'hat_net_tiny', '--img-size', 32, '--batch-size', 8, '--workers', 0)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data') / 'colours')


@pytest.fixture(scope='module')
def run(folder, tmp_path_factory):
    """A short training run on the generated ImageFolder (36 training images: 4 steps per epoch)."""
    run_dir = tmp_path_factory.mktemp('runs') / 'colours'
    torch.set_num_threads(1)
    assert hatnet(*TRAIN, '--data', folder, '--out', run_dir, '--epochs', 2, '--lr', 2e-3) == 0
    return run_dir


def _rows(run_dir):
    import csv
    with open(run_dir / 'metrics.csv') as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_writes_the_run(run):
    rows = _rows(run)
    assert [row['epoch'] for row in rows] == ['1.0', '2.0']
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    assert float(rows[-1]['val_loss']) < float(rows[0]['val_loss'])
    for name in ('config.yaml', 'best.pth', 'last.pth', 'curves.png', 'log.txt'):
        assert (run / name).is_file()
    state = torch.load(run / 'best.pth', weights_only=True)['task_state']
    assert state['class_names'] == sorted(COLOURS) and state['model'] == 'hat_net_tiny'


def test_eval_json_matches_the_training_evaluation(run, folder, capsys):
    capsys.readouterr()
    assert hatnet('eval', '--data', folder, '--checkpoint', run, '--json', '--workers', 0) == 0
    report = json.loads(capsys.readouterr().out)
    best = torch.load(run / 'best.pth', weights_only=True)['metrics']
    assert report['top1'] == pytest.approx(best['val_top1']) and report['top5'] == pytest.approx(best['val_top5'])
    assert 0 <= report['top1'] <= 1 and report['images'] == 12 and set(report['per_class']) == set(COLOURS)
    assert Image.open(report['confusion_matrix']).size[0] > 100


def test_eval_defaults_to_the_runs_own_data_and_prints_tables(run, capsys):
    capsys.readouterr()
    assert hatnet('eval', '--checkpoint', run, '--workers', 0) == 0
    out = capsys.readouterr().out
    assert 'top-1' in out and 'per-class accuracy' in out and 'green' in out


def test_predict_gives_named_top_k(run, folder, capsys):
    images = sorted((folder / 'val' / 'red').glob('*.png'))[:2]
    capsys.readouterr()
    assert hatnet('predict', *images, '--checkpoint', run, '--top-k', 2, '--json') == 0
    results = json.loads(capsys.readouterr().out)
    assert [r['image'] for r in results] == [str(p) for p in images]
    for r in results:
        probs = [p['probability'] for p in r['predictions']]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(p['name'] == sorted(COLOURS)[p['index']] for p in r['predictions'])
    assert hatnet('predict', images[0], '--checkpoint', run) == 0
    assert 'probability' in capsys.readouterr().out


def test_predict_takes_folders_and_patterns_and_writes_pictures_and_a_csv(run, folder, tmp_path, capsys):
    import csv
    capsys.readouterr()
    # a folder (recursive: val/blue, val/green, val/red) and a quoted pattern that names some of them again
    assert hatnet('predict', folder / 'val', str(folder / 'val' / 'red' / '*.png'), '--checkpoint', run,
                  '--top-k', 2, '--out', tmp_path / 'out', '--json') == 0
    results = json.loads(capsys.readouterr().out)
    every = sorted((folder / 'val').rglob('*.png'))
    assert [r['image'] for r in results] == [str(p) for p in every]  # each image once, in order
    # equal stems (blue/0.png, red/0.png) get names from their folders, one picture each
    pictures = sorted(p.name for p in (tmp_path / 'out').glob('*.png'))
    assert pictures == sorted(f'{p.parent.name}_{p.stem}.png' for p in every)
    picture = Image.open(tmp_path / 'out' / 'red_0.png')
    assert picture.height == 384 and picture.width > 384  # the image, and the bars beside it
    with open(tmp_path / 'out' / 'predictions.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(every) and rows[0]['image'] == str(every[0])
    assert rows[0]['class'] == results[0]['predictions'][0]['name']
    # nothing is replaced without --overwrite; a pattern matching nothing is one line
    assert hatnet('predict', folder / 'val', '--checkpoint', run, '--out', tmp_path / 'out') == 2
    assert hatnet('predict', str(tmp_path / 'nothing' / '*.jpg'), '--checkpoint', run) == 2
    assert 'matches no image' in capsys.readouterr().err


def test_predict_takes_the_frames_of_a_video(run, tmp_path, capsys):
    from test_images import write_video
    video = write_video(tmp_path / 'clip.mp4', [COLOURS['red']] * 4 + [COLOURS['blue']] * 4)
    capsys.readouterr()
    assert hatnet('predict', video, '--frame-stride', 3, '--checkpoint', run, '--out', tmp_path / 'out',
                  '--json') == 0
    results = json.loads(capsys.readouterr().out)
    assert [r['image'] for r in results] == [f'{video}#frame={i}' for i in (0, 3, 6)]
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.png')) == [f'clip_00000{i}.png' for i in (0, 3, 6)]
    # the frames are what the model sees: the same top class as the frame saved as an image
    Image.fromarray(np.full((32, 48, 3), COLOURS['blue'], np.uint8)).save(tmp_path / 'blue.png')
    assert hatnet('predict', tmp_path / 'blue.png', '--checkpoint', run, '--json') == 0
    still = json.loads(capsys.readouterr().out)[0]['predictions'][0]['name']
    assert results[2]['predictions'][0]['name'] == still


def test_predict_checks_every_image_before_writing_anything(run, folder, tmp_path, capsys):
    images = tmp_path / 'images'
    shutil.copytree(folder / 'val' / 'red', images)
    data = (images / '3.png').read_bytes()
    (images / '3.png').write_bytes(data[:len(data) // 2])  # truncated
    assert hatnet('predict', images, '--checkpoint', run, '--out', tmp_path / 'out', '--batch-size', 1) == 2
    assert '3.png' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_predict_uses_imagenet_names_for_1000_classes(tmp_path, folder, capsys):
    from hatnet.convert import convert_checkpoint
    torch.save({'model': reference_state_dict('tiny', 1)}, tmp_path / 'original.pth')
    convert_checkpoint(tmp_path / 'original.pth', tmp_path / 'tiny.safetensors')
    capsys.readouterr()
    assert hatnet('predict', sorted((folder / 'val' / 'red').glob('*.png'))[0], '--checkpoint',
                  tmp_path / 'tiny.safetensors', '--json', '--top-k', 3) == 0
    predictions = json.loads(capsys.readouterr().out)[0]['predictions']
    info = timm.data.ImageNetInfo()
    assert all(p['name'] == info.index_to_description(p['index']) for p in predictions)


def test_fine_tuning_from_an_original_checkpoint_resets_the_head_and_freezes_stages(folder, tmp_path):
    original = reference_state_dict('tiny', 5)
    torch.save({'model': original}, tmp_path / 'HAT-Net_Tiny.pth')
    out = tmp_path / 'finetune'
    assert hatnet(*TRAIN, '--data', folder, '--out', out, '--iters', 2, '--pretrained', tmp_path / 'HAT-Net_Tiny.pth',
                  '--frozen-stages', 1) == 0
    tuned = torch.load(out / 'last.pth', weights_only=True)['model']
    reference = timm.create_model('hat_net_tiny', pretrained=True,
                                  pretrained_cfg_overlay=dict(state_dict=original)).state_dict()
    assert tuned['head.weight'].shape == (3, 384)
    frozen = [k for k in tuned if k.startswith(('stem.', 'stages.0.'))]
    assert frozen and all(torch.equal(tuned[k], reference[k]) for k in frozen)
    assert not torch.equal(tuned['stages.3.blocks.0.attn.qkv.weight'], reference['stages.3.blocks.0.attn.qkv.weight'])


def test_resume_after_a_crash_reaches_the_uninterrupted_state(folder, tmp_path, monkeypatch):
    """Mixup + CutMix, RandAugment, random erasing and EMA all draw random numbers; a crash between two
    checkpoints and a resume must still end with exactly the uninterrupted run's weights."""
    args = (*TRAIN, '--data', folder, '--iters', 4, '--save-every', 2, '--eval-every', 3, '--mixup', 0.8,
            '--cutmix', 1.0, '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', 0.25, '--ema')
    assert hatnet(*args, '--out', tmp_path / 'full') == 0

    calls = {'n': 0}
    original_step = ClassificationTask.train_step

    def crashing_step(self, *a):
        calls['n'] += 1
        if calls['n'] == 4:
            raise RuntimeError('simulated crash')  # in step 4, after the evaluation and checkpoint of step 3
        return original_step(self, *a)

    monkeypatch.setattr(ClassificationTask, 'train_step', crashing_step)
    with pytest.raises(RuntimeError, match='simulated crash'):
        main([str(a) for a in (*args, '--out', tmp_path / 'crashed')])
    monkeypatch.undo()
    last = torch.load(tmp_path / 'crashed' / 'last.pth', weights_only=True)
    assert (last['step'], last['batch_in_epoch']) == (3, 3)  # in the middle of the epoch
    assert hatnet('train', '--out', tmp_path / 'crashed', '--resume') == 0

    full = torch.load(tmp_path / 'full' / 'last.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'crashed' / 'last.pth', weights_only=True)
    for key in ('model', 'ema'):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])


def _no_class_folders(root):
    shutil.rmtree(root / 'train')
    (root / 'train').mkdir()
    return root


def _empty_class(root):
    for image in (root / 'train' / 'blue').iterdir():
        image.unlink()
    return root


def _mismatched_val(root):
    (root / 'val' / 'green').rename(root / 'val' / 'purple')
    return root


def _broken_val_image(root):
    (root / 'val' / 'red' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    return root


def _unchanged(root):
    return root


@pytest.mark.parametrize('make, options, message', [
    (lambda root: root / 'missing', (), 'dataset folder {root} does not exist'),
    (_no_class_folders, (), '{root}/train has no class folders'),
    (_empty_class, (), 'Found no valid file for the classes blue'),
    (_mismatched_val, (), 'only in {root}/train: green; only in {root}/val: purple'),
    (_broken_val_image, ('--workers', 2), 'cannot read image {root}/val/red/broken.png'),
    (_unchanged, ('--pretrained', 'SMALL'), 'it looks like hat_net_small'),
    (_unchanged, ('--resume',), 'is not a run directory'),
    (_unchanged, ('--model', 'hat_net_nano'), "unknown model 'hat_net_nano'"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, make, options, message):
    root = make(make_image_folder(tmp_path / 'data', per_class=(8, 2), size=32))
    if 'SMALL' in options:
        torch.save(reference_state_dict('small', 0), tmp_path / 'small.pth')
        options = [str(tmp_path / 'small.pth') if o == 'SMALL' else o for o in options]
    capsys.readouterr()
    code = hatnet(*TRAIN, '--data', root, '--out', tmp_path / 'run', '--iters', 1, *options)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, if training began
    assert code == 2
    assert last_line.startswith('error: ') and message.format(root=root) in last_line, last_line
    assert not (tmp_path / 'run' / 'last.pth').exists()


def test_eval_rejects_a_checkpoint_of_another_variant_or_other_classes(run, folder, tmp_path, capsys):
    torch.save(reference_state_dict('small', 0), tmp_path / 'small.pth')
    shutil.copytree(folder, tmp_path / 'renamed')
    (tmp_path / 'renamed' / 'val' / 'red').rename(tmp_path / 'renamed' / 'val' / 'crimson')
    capsys.readouterr()
    assert hatnet('eval', '--data', 'digits', '--checkpoint', run, '--model', 'hat_net_small') == 2
    assert 'holds a hat_net_tiny, not a hat_net_small' in capsys.readouterr().err
    assert hatnet('eval', '--data', 'digits', '--checkpoint', tmp_path / 'small.pth', '--model',
                  'hat_net_tiny') == 2
    assert 'looks like hat_net_small' in capsys.readouterr().err
    assert hatnet('eval', '--data', 'digits', '--checkpoint', run, '--workers', 0) == 2
    assert 'digits has 10 classes, the model only 3 outputs' in capsys.readouterr().err
    assert hatnet('eval', '--data', tmp_path / 'renamed', '--checkpoint', run, '--workers', 0) == 2
    assert "the classes of the checkpoint and {}/val differ (only in the checkpoint: red; only in {}/val: " \
           "crimson)".format(tmp_path / 'renamed', tmp_path / 'renamed') in capsys.readouterr().err


def test_metrics_on_a_hand_made_case():
    """Six images, six classes; the model's scores are fixed per image, so every number is known."""
    scores = torch.tensor([
        [9., 1, 0, 0, 0, 0],   # true 0, predicted 0
        [1., 9, 0, 0, 0, 0],   # true 1, predicted 1
        [9., 0, 1, 0, 0, 0],   # true 2, predicted 0 (2 is 2nd): top-5 hit
        [0., 0, 0, 9, 8, 7],   # true 3, predicted 3
        [9., 8, 7, 6, 5, 0],   # true 5, predicted 0 (5 is last): top-5 miss
        [0., 0, 0, 0, 9, 1],   # true 4, predicted 4
    ])
    targets = torch.tensor([0, 1, 2, 3, 5, 4])

    class Lookup(torch.nn.Module):
        def forward(self, index):
            return scores[index[:, 0].long()]

    loader = DataLoader(TensorDataset(torch.arange(6.)[:, None], targets), batch_size=4)
    confusion, top5, loss = confusion_matrix(Lookup(), loader, 'cpu', 6)
    metrics = summarize(confusion, top5, loss)
    assert metrics['top1'] == pytest.approx(4 / 6) and metrics['top5'] == pytest.approx(5 / 6)
    assert metrics['mean_class_acc'] == pytest.approx(4 / 6)
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(scores, targets).item(), rel=1e-6)
    assert confusion[2, 0] == 1 and confusion[5, 0] == 1 and confusion.trace() == 4
    assert per_class_accuracy(confusion).tolist() == [1., 1., 0., 1., 1., 0.]
    assert np.isnan(per_class_accuracy(torch.zeros(2, 2))).all()


def test_digits_dataset():
    train, val = DigitsDataset('train', size=32), DigitsDataset('val', size=32)
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(set(val.targets)) == list(range(10)) and train.images[0].size == (32, 32)
    assert train.images[0].mode == 'RGB'


@pytest.mark.parametrize('stage', [0, 3])
def test_attention_probabilities_reproduce_the_module_output(stage):
    """The recomputed probabilities, applied to the values, give the attention module's own output."""
    torch.manual_seed(0)
    model = timm.create_model('hat_net_tiny', num_classes=3).eval()
    image = torch.randn(3, 70, 90)  # ragged grid cells on every stage
    result = attention_probabilities(model, image, stage, 0, (89., 69.))  # bottom-right: a ragged cell
    attn = model.stages[stage].blocks[0].attn
    heads, head_dim = attn.num_heads, attn.head_dim
    row, col = result['query']
    assert (row, col) == (result['map_size'][0] - 1, result['map_size'][1] - 1)
    x = result['x']

    def heads_of(t):
        return t.reshape(heads, head_dim, *t.shape[-2:])

    with torch.no_grad():
        qkv = attn.qkv(attn.norm(x))
        v = heads_of(qkv.chunk(3, dim=1)[2])
        if attn.grid_norm is None:
            mixed = torch.einsum('hyx,hdyx->hd', result['global'], v)
        else:
            top, left = result['cell']
            cell_v = v[:, :, top:top + attn.grid_size, left:left + attn.grid_size]
            local_out = torch.einsum('hyx,hdyx->hd', result['local'], cell_v).reshape(-1)
            expected = grid_attention(qkv, attn.grid_size, heads)[0, :, row, col]
            assert torch.allclose(local_out, expected, atol=1e-5)
            local = attn.grid_norm(x + grid_attention(qkv, attn.grid_size, heads))
            pooled_v = heads_of(attn.kv(attn.ds_norm(attn.pool(local))).chunk(2, dim=1)[1])
            mixed = local[0, :, row, col].reshape(heads, head_dim) + torch.einsum(
                'hyx,hdyx->hd', result['global'], pooled_v)
        out = attn.proj(mixed.reshape(1, -1, 1, 1))[0, :, 0, 0]
    assert torch.allclose(out, result['output'][0, :, row, col], atol=1e-4)
    for key in ('local', 'global'):
        if key in result:
            assert torch.allclose(result[key].flatten(1).sum(1), torch.ones(heads))


def test_attention_command_writes_a_png(run, folder, tmp_path, capsys):
    image = sorted((folder / 'val' / 'blue').glob('*.png'))[0]
    assert hatnet('attention', image, '--checkpoint', run, '--block', '1.0', '--query', '5,20',
                  '--out', tmp_path / 'a.png') == 0
    assert Image.open(tmp_path / 'a.png').size[0] > 600
    assert hatnet('attention', image, '--checkpoint', run, '--block', '7.0') == 2
    assert 'the model has 4 stages with [2, 2, 6, 3] blocks' in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """The real launcher: torchrun starts two gloo processes of `hatnet train`."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(sys.path))
    out = tmp_path / 'ddp'
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                    '29517', '-m', 'hatnet', 'train', '--data', 'digits', '--out', str(out), '--iters', '4',
                    '--eval-every', '2', '--batch-size', '16'], check=True, env=env, cwd=tmp_path)
    rows = _rows(out)
    assert [r['step'] for r in rows] == ['2', '4']
    assert torch.load(out / 'last.pth', weights_only=True)['world_size'] == 2


@pytest.mark.slow
def test_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hatnet('demo', '--epochs', 2) == 0
    rows = _rows(tmp_path / 'hatnet-demo')
    assert len(rows) == 2 and 0 < float(rows[-1]['val_top1']) <= 1
    assert (tmp_path / 'hatnet-demo' / 'confusion_matrix.png').is_file()
    assert 'validation accuracy' in capsys.readouterr().out
