"""``hatnet seg train / eval / predict`` end to end on generated shapes: learning, metrics, outputs, bad input."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from hatnet.cli import main
from hatnet.data.segmentation import SHAPE_CLASSES, write_shapes_dataset
from hatnet.engine import load_run_checkpoint
from hatnet.tasks.segmentation import SegmentationConfig, SegmentationTask
from test_segmentation_model import one_thread  # noqa: F401  (autouse fixture)

# all-background prediction on these sets scores mIoU ~0.21 (background IoU ~0.85, the shapes 0)
CHANCE_MIOU = 0.25
TEST_RECIPE = dict(layout='folders', norm='gn', drop_path_rate=0.0, batch_size=8, lr=2e-3, lr_base_size=0,
                   weight_decay=1e-4, sched='poly', warmup_iters=5, clip_grad=1.0, workers=1)


def cli(*args):
    """Run ``hatnet ARGS`` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('shapes'), 'folders', num_train=64, num_val=16,
                                size=(48, 72), seed=0)


@pytest.fixture(scope='module')
def trained(shapes, tmp_path_factory):
    """A short run of a small timm backbone (the fast variant; HAT-Net-Tiny learns in the slow test)."""
    tmp = tmp_path_factory.mktemp('run')
    (tmp / 'recipe.yaml').write_text(yaml.safe_dump(TEST_RECIPE))
    code, out, err = cli('seg', 'train', '--data', shapes, '--model', 'resnet10t', '--out', tmp / 'run',
                         '--recipe', tmp / 'recipe.yaml', '--iters', 40, '--eval-every', 20,
                         '--crop-size', 48, '--short-side', 48)
    assert code == 0, err
    return tmp / 'run'


def test_short_training_run_beats_chance_on_held_out_images(trained, shapes):
    with open(trained / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['step']) for r in rows] == [20, 40]
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', trained, '--json')
    assert code == 0, err
    result = json.loads(out)
    assert result['mIoU'] > 2 * CHANCE_MIOU and 0 <= result['mAcc'] <= 1 and result['aAcc'] > 0.85
    # the eval command reproduces the trainer's evaluation of the best checkpoint
    best = load_run_checkpoint(trained).metrics
    assert result['mIoU'] == pytest.approx(best['val_mIoU'], abs=1e-6)
    assert list(result['per_class']) == list(SHAPE_CLASSES)
    # the per-class CSV next to the run holds the same numbers
    with open(result['csv']) as f:
        table = list(csv.reader(f))
    assert table[0] == ['class', 'IoU', 'Acc'] and len(table) == 1 + len(SHAPE_CLASSES) + 2
    assert float(table[2][1]) == pytest.approx(result['per_class']['disc']['IoU'], abs=1e-6)
    assert float(table[-2][1]) == pytest.approx(result['mIoU'], abs=1e-6)


def test_eval_prints_a_table(trained, shapes):
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', trained / 'best.pth', '--flip', '--slide',
                         '--csv', trained / 'flip.csv')
    assert code == 0, err
    assert all(name in out for name in SHAPE_CLASSES) and 'mIoU' in out and (trained / 'flip.csv').is_file()


def test_predict_writes_palette_masks_and_overlays_of_the_image_size(trained, shapes, tmp_path):
    images = sorted((shapes / 'images' / 'val').iterdir())[:3]
    code, out, err = cli('seg', 'predict', *images, '--checkpoint', trained, '--out', tmp_path / 'pred', '--json')
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 3
    correct = total = 0
    for image_path, result in zip(images, results):
        image = Image.open(image_path)
        mask, overlay = Image.open(result['mask']), Image.open(result['overlay'])
        assert mask.format == overlay.format == 'PNG'
        assert mask.size == overlay.size == image.size and result['size'] == list(image.size)
        assert mask.mode == 'P' and overlay.mode == 'RGB'
        labels = np.asarray(mask)
        assert labels.max() < len(SHAPE_CLASSES)
        truth = np.asarray(Image.open(shapes / 'masks' / 'val' / f'{image_path.stem}.png'))
        correct += ((labels == truth) & (truth != 255)).sum()
        total += (truth != 255).sum()
    assert correct / total > 0.85  # the masks are the model's predictions, not noise


def test_bad_dataset_is_one_line_and_no_run_directory(shapes, tmp_path):
    data = Path(shutil.copytree(shapes, tmp_path / 'data'))
    mask = data / 'masks' / 'train' / '00003.png'
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask)
    code, out, err = cli('seg', 'train', '--data', data, '--layout', 'folders', '--model', 'resnet10t',
                         '--out', tmp_path / 'run', '--iters', 2, '--batch-size', 2)
    assert code == 2 and str(mask) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'run').exists()
    code, out, err = cli('seg', 'train', '--data', shapes, '--layout', 'folders', '--model', 'resnet10t',
                         '--out', tmp_path / 'run', '--pretrained', tmp_path / 'missing.pth')
    assert code == 2 and 'missing.pth' in err and not (tmp_path / 'run').exists()


def test_eval_and_predict_reject_bad_input(trained, shapes, tmp_path):
    # a dataset with labels the run does not know
    data = Path(shutil.copytree(shapes, tmp_path / 'data'))
    (data / 'classes.yaml').unlink()
    mask = data / 'masks' / 'val' / '00002.png'
    labels = np.asarray(Image.open(mask)).copy()
    labels[3, 3] = 9
    Image.fromarray(labels).save(mask)
    code, _, err = cli('seg', 'eval', '--data', data, '--checkpoint', trained, '--json')
    assert code == 2 and str(mask) in err and 'label 9' in err

    torch.save({'weights': torch.zeros(3)}, tmp_path / 'bare.pth')
    code, _, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', tmp_path / 'bare.pth')
    assert code == 2 and 'bare.pth' in err

    code, _, err = cli('seg', 'predict', tmp_path / 'missing.jpg', '--checkpoint', trained, '--out', tmp_path / 'p')
    assert code == 2 and 'missing.jpg' in err and not (tmp_path / 'p').exists()


def test_pretrained_run_directory_means_its_best_checkpoint(shapes, tmp_path):
    classifier = timm.create_model('resnet10t', num_classes=7)
    (tmp_path / 'cls').mkdir()
    torch.save({'format': 'hatnet-run', 'task': 'classification', 'model': classifier.state_dict()},
               tmp_path / 'cls' / 'best.pth')
    task = SegmentationTask(SegmentationConfig(data=str(shapes), layout='folders', model='resnet10t',
                                               pretrained=str(tmp_path / 'cls')))
    task.build_datasets()
    torch.testing.assert_close(task.build_model().backbone.conv1[0].weight, classifier.conv1[0].weight)


def test_shapes_command_writes_an_ade20k_style_set(tmp_path):
    code, _, err = cli('seg', 'shapes', tmp_path / 'ade', '--layout', 'ade20k', '--train', 3, '--val', 2)
    assert code == 0, err
    assert len(list((tmp_path / 'ade' / 'annotations' / 'validation').glob('*.png'))) == 2
    code, _, err = cli('seg', 'shapes', tmp_path / 'ade')
    assert code == 2 and 'not an empty folder' in err


@pytest.mark.slow
def test_hat_net_tiny_learns_the_shapes(tmp_path):
    """HAT-Net-Tiny from scratch: a few hundred CPU steps segment held-out shapes far above chance."""
    data = write_shapes_dataset(tmp_path / 'shapes', 'folders', num_train=128, num_val=32, size=(64, 96), seed=1)
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump(dict(TEST_RECIPE, lr=1e-3, warmup_iters=20)))
    code, _, err = cli('seg', 'train', '--data', data, '--model', 'hat_net_tiny', '--out', tmp_path / 'run',
                       '--recipe', tmp_path / 'recipe.yaml', '--iters', 300, '--eval-every', 300,
                       '--crop-size', 64, '--short-side', 64)
    assert code == 0, err
    assert load_run_checkpoint(tmp_path / 'run').metrics['val_mIoU'] > 2 * CHANCE_MIOU


@pytest.mark.slow
def test_two_process_training_with_torchrun(shapes, tmp_path):
    """DDP over gloo: both processes train, the confusion matrices are summed across them."""
    # in-process data loading: a DataLoader worker forked next to gloo's threads once hung in CPython's
    # after-fork handling (Python 3.11)
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump(dict(TEST_RECIPE, batch_size=4, workers=0, eval_every=10)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    '-m', 'hatnet', 'seg', 'train', '--data', str(shapes), '--model', 'resnet10t',
                    '--out', str(tmp_path / 'run'), '--recipe', str(tmp_path / 'recipe.yaml'), '--iters', '20',
                    '--crop-size', '48', '--short-side', '48'], check=True, env=env, capture_output=True, timeout=600)
    run_metrics = load_run_checkpoint(tmp_path / 'run').metrics
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', tmp_path / 'run', '--json')
    assert code == 0, err
    # one process evaluating all images gives what two processes gave together
    assert json.loads(out)['mIoU'] == pytest.approx(run_metrics['val_mIoU'], abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(shapes, tmp_path):
    """kill -9 a training process between checkpoints, resume it: the augmentation and data order continue
    exactly, so the weights equal those of an uninterrupted run."""
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump(dict(TEST_RECIPE, batch_size=4, threads=1)))
    args = ['seg', 'train', '--data', shapes, '--model', 'resnet10t', '--recipe', tmp_path / 'recipe.yaml',
            '--iters', 12, '--eval-every', 12, '--save-every', 2, '--crop-size', 48, '--short-side', 48]
    assert cli(*args, '--out', tmp_path / 'full')[0] == 0
    run = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, '-m', 'hatnet', *map(str, args), '--out', str(run)],
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run / 'last.pth').exists():
        time.sleep(0.05)
    assert proc.poll() is None, 'the training process ended before it was killed'
    proc.kill()
    proc.wait()
    assert 0 < torch.load(run / 'last.pth', weights_only=True)['step'] < 12
    code, _, err = cli('seg', 'train', '--out', run, '--resume')  # the run's own config.yaml
    assert code == 0, err
    full, resumed = (torch.load(r / 'last.pth', weights_only=True)['model'] for r in (tmp_path / 'full', run))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
