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
                         '--recipe', tmp / 'recipe.yaml', '--iters', 20, '--eval-every', 10,
                         '--crop-size', 48, '--short-side', 48)
    assert code == 0, err
    return tmp / 'run'


def test_eval_reproduces_the_trainers_evaluation(trained, shapes):
    with open(trained / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['step']) for r in rows] == [10, 20]
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', trained, '--json')
    assert code == 0, err
    result = json.loads(out)
    assert 0 <= result['mIoU'] <= 1 and 0 <= result['mAcc'] <= 1 and 0 <= result['aAcc'] <= 1
    best = load_run_checkpoint(trained).metrics
    assert result['mIoU'] == pytest.approx(best['val_mIoU'], abs=1e-6)
    assert list(result['per_class']) == list(SHAPE_CLASSES)
    # the per-class CSV next to the run holds the same numbers
    with open(result['csv']) as f:
        table = list(csv.reader(f))
    assert table[0] == ['class', 'IoU', 'Acc'] and len(table) == 1 + len(SHAPE_CLASSES) + 2
    background = result['per_class'][SHAPE_CLASSES[0]]['IoU']
    assert table[1][0] == SHAPE_CLASSES[0] and float(table[1][1]) == pytest.approx(background, abs=1e-6)
    assert float(table[-2][1]) == pytest.approx(result['mIoU'], abs=1e-6)


def _confusion(truth: np.ndarray, predicted: np.ndarray, num_classes: int, ignore: int = 255) -> np.ndarray:
    labelled = truth != ignore
    pairs = truth[labelled].astype(np.int64) * num_classes + predicted[labelled]
    return np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes in the annotations or the predictions."""
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    return float(np.mean(hits[union > 0] / union[union > 0]))


def test_eval_miou_equals_a_count_over_the_predicted_label_pngs(trained, shapes, tmp_path):
    images = sorted((shapes / 'images' / 'val').iterdir())
    code, out, err = cli('seg', 'predict', *images, '--checkpoint', trained, '--out', tmp_path / 'pred', '--json')
    assert code == 0, err
    confusion = 0
    for image, result in zip(images, json.loads(out)):
        truth = np.asarray(Image.open(shapes / 'masks' / 'val' / f'{image.stem}.png'))
        confusion = confusion + _confusion(truth, np.asarray(Image.open(result['labels'])), len(SHAPE_CLASSES))
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', trained, '--json')
    assert code == 0, err
    assert json.loads(out)['mIoU'] == pytest.approx(_miou(confusion), abs=1e-4)


def test_eval_prints_a_table(trained, shapes):
    code, out, err = cli('seg', 'eval', '--data', shapes, '--checkpoint', trained / 'best.pth', '--flip', '--slide',
                         '--csv', trained / 'flip.csv')
    assert code == 0, err
    assert all(name in out for name in SHAPE_CLASSES) and 'mIoU' in out and (trained / 'flip.csv').is_file()


def test_predict_writes_label_pngs_palette_masks_and_overlays_of_the_image_size(trained, shapes, tmp_path):
    images = sorted((shapes / 'images' / 'val').iterdir())[:3]
    code, out, err = cli('seg', 'predict', *images, '--checkpoint', trained, '--out', tmp_path / 'pred', '--json')
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 3 and json.loads((tmp_path / 'pred' / 'predictions.json').read_text()) == results
    predictor = SegmentationTask.load(trained, 'cpu')
    for image_path, result, direct in zip(images, results, predictor.predict(images)):
        image = Image.open(image_path)
        labels, mask, overlay = (Image.open(result[kind]) for kind in ('labels', 'mask', 'overlay'))
        assert Path(result['labels']).name == f'{image_path.stem}_labels.png'
        assert labels.format == mask.format == overlay.format == 'PNG'
        assert labels.size == mask.size == image.size and result["size"] == list(image.size)
        assert overlay.width == image.width and overlay.height > image.height  # the legend below the photo
        assert labels.mode == 'L' and mask.mode == 'P' and overlay.mode == 'RGB'
        # both hold the model's class indices
        assert np.array_equal(np.asarray(labels), direct.mask) and np.array_equal(np.asarray(mask), direct.mask)


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


def _geometry_blind_miou(data: Path) -> float:
    """The best mIoU of the validation set without telling shapes apart: background and foreground exactly
    right, the foreground all one class, or each pixel a random class."""
    truths = [np.asarray(Image.open(p)) for p in sorted((data / 'masks' / 'val').glob('*.png'))]
    rng = np.random.default_rng(0)
    guesses = [lambda t, c=c: np.where(t > 0, c, 0) for c in range(1, len(SHAPE_CLASSES))]
    guesses.append(lambda t: np.where(t > 0, rng.integers(1, len(SHAPE_CLASSES), t.shape), 0))
    return max(_miou(sum(_confusion(t, guess(t), len(SHAPE_CLASSES)) for t in truths))
               for guess in guesses)


@pytest.fixture(scope='module')
def geometry_shapes(tmp_path_factory):
    """Shapes told apart by geometry only, at the size of `hatnet seg shapes` (seed 1: not the one of the docs)."""
    return write_shapes_dataset(tmp_path_factory.mktemp('geometry'), 'folders', num_train=300, num_val=60,
                                size=(96, 128), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize('backbone_zeroed', [pytest.param(False, id='hat_net_tiny'),
                                             pytest.param(True, id='backbone_zeroed')])
def test_hat_net_tiny_learns_shapes_by_their_geometry(geometry_shapes, tmp_path, monkeypatch, backbone_zeroed):
    """HAT-Net-Tiny from scratch with the auto recipe (no flags but the length): far above what a model
    that finds the foreground but cannot tell shapes apart scores. The same run with the backbone's
    features zeroed (only the head learns, from nothing) stays below that line, as did the earlier auto
    recipe (Semantic FPN, scales 0.75-1.5x: mIoU 0.33 on the docs' seed)."""
    if backbone_zeroed:
        build_model = SegmentationTask.build_model

        def zeroed(task):
            model = build_model(task)
            model.backbone.register_forward_hook(lambda module, inputs, features: [f * 0 for f in features])
            return model
        monkeypatch.setattr(SegmentationTask, 'build_model', zeroed)
    code, _, err = cli('seg', 'train', '--data', geometry_shapes, '--out', tmp_path / 'run', '--iters', 600)
    assert code == 0, err
    blind = _geometry_blind_miou(geometry_shapes)
    assert 0.3 < blind < 0.45
    learned = load_run_checkpoint(tmp_path / 'run').metrics['val_mIoU']
    assert (learned > blind + 0.15) != backbone_zeroed, (learned, blind)


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


def test_the_overlay_keeps_the_photo_where_the_background_is_and_names_the_painted_classes():
    from hatnet.data.segmentation import make_palette
    from hatnet.tasks.segmentation import Segmentation
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    mask = np.zeros((60, 80), np.int64)
    mask[10:30, 10:40], mask[40:50, 50:70] = 2, 3  # square, triangle; no circle
    names = ['background', 'circle', 'square', 'triangle']
    result = Segmentation('x.png', mask, names, make_palette(4), picture=photo)
    plain = np.asarray(result.overlay(0.5)).astype(int)
    pixels = np.asarray(photo).astype(int)
    assert np.array_equal(plain[mask == 0], pixels[mask == 0])  # the photo itself, not dimmed
    square = np.array(make_palette(4)[2])
    assert np.abs(plain[mask == 2] - (pixels[mask == 2] + square) / 2).max() <= 1  # the class colour blended in
    with_legend = result.overlay(0.5, legend=True)
    assert with_legend.width == 80 and with_legend.height > 60
    assert np.array_equal(np.asarray(with_legend)[:60], plain.astype(np.uint8))
    legend = np.asarray(with_legend)[60:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    assert tuple(square) in colours and tuple(make_palette(4)[3]) in colours  # swatches of the painted classes
    assert tuple(make_palette(4)[1]) not in colours  # and none of a class the image does not hold
