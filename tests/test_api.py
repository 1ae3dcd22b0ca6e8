"""The public Python API: ``hatnet.load(run)`` -> ``predict(images)`` / ``evaluate(data)`` for every task.

Each task gets a one-step training run (enough for a checkpoint written by the trainer); the predictions
must be typed, sized like the inputs, named with the run's classes and independent of how an image is
given (file, PIL image, numpy array); ``evaluate`` must give what the ``eval --json`` command prints.
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import hatnet
from detection_shapes import CATEGORIES, write_shapes_dataset as write_detection_shapes
from hatnet.cli import main
from hatnet.data.segmentation import SHAPE_CLASSES, write_shapes_dataset
from hatnet.engine import TrainConfig, train
from hatnet.reference import reference_state_dict
from hatnet.tasks.classification import Classification, ClassificationConfig, ClassificationTask
from hatnet.tasks.detection import Detection, DetectionConfig, DetectionTask
from hatnet.tasks.segmentation import Segmentation, SegmentationConfig, SegmentationTask
from test_classification import COLOURS, make_image_folder
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)


def _train_one_step(task, out, batch_size):
    train(task, TrainConfig(out=str(out), iters=1, batch_size=batch_size, workers=0, lr=1e-3, device='cpu'))
    return out


def _cli_json(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert not exit_info.value.code
    return json.loads(out.getvalue())


def _three_ways(path):
    """The same image as a file, a PIL image and a numpy array."""
    return [path, Image.open(path), np.asarray(Image.open(path).convert('RGB'))]


def _as_json(metrics):
    """The metrics as the commands print them (NaN, for what COCO or a missing class leaves undefined: null)."""
    def without_nan(value):
        if isinstance(value, dict):
            return {k: without_nan(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value
    return json.loads(json.dumps(without_nan(metrics)))


@pytest.fixture(scope='module')
def classification_run(tmp_path_factory):
    folder = make_image_folder(tmp_path_factory.mktemp('colours') / 'colours', per_class=(4, 2), size=32)
    task = ClassificationTask(ClassificationConfig(data=str(folder), model='hat_net_tiny', img_size=32))
    return _train_one_step(task, tmp_path_factory.mktemp('runs') / 'cls', batch_size=8), folder


def test_classification(classification_run):
    run, folder = classification_run
    predictor = hatnet.load(run, device='cpu')
    assert predictor.task == 'classification' and predictor.device == torch.device('cpu')
    assert predictor.class_names == sorted(COLOURS) and not predictor.model.training
    path = sorted((folder / 'val' / 'red').glob('*.png'))[0]
    grey = np.asarray(Image.open(path).convert('L'))
    results = predictor.predict([*_three_ways(path), grey], top_k=2)
    assert [type(r) for r in results] == [Classification] * 4
    assert [r.image for r in results] == [str(path), None, None, None]
    for r in results:
        assert len(r.labels) == 2 and r.labels == [predictor.class_names[i] for i in r.indices]
        assert r.scores == sorted(r.scores, reverse=True) and 0 < sum(r.scores) <= 1 + 1e-6
    for r in results[1:3]:
        assert r.indices == results[0].indices and r.scores == pytest.approx(results[0].scores, abs=1e-6)
    alone = predictor.predict(path, top_k=2)  # one image, as the command predicts it
    assert _cli_json('predict', path, '--checkpoint', run, '--top-k', 2, '--json') == [alone[0].to_dict()]
    assert len(predictor.predict(path, top_k=5)[0].indices) == 3  # no more than the classes

    metrics = predictor.evaluate(str(folder), workers=0)
    report = _cli_json('eval', '--data', folder, '--checkpoint', run, '--json', '--workers', 0)
    for key in ('top1', 'top5', 'loss', 'mean_class_acc', 'images', 'per_class'):
        assert metrics[key] == pytest.approx(report[key]), key
    assert metrics['images'] == 6 and np.array(metrics['confusion']).sum() == 6


def test_a_bare_weights_file_is_an_imagenet_classifier(tmp_path, classification_run):
    _, folder = classification_run
    torch.save({'model': reference_state_dict('tiny', 1)}, tmp_path / 'HAT-Net_Tiny.pth')
    predictor = hatnet.load(tmp_path / 'HAT-Net_Tiny.pth', device='cpu', img_size=64)
    assert predictor.model_name == 'hat_net_tiny' and len(predictor.class_names) == 1000
    result = predictor.predict(sorted((folder / 'val' / 'red').glob('*.png'))[0], top_k=3)[0]
    assert result.labels == [predictor.class_names[i] for i in result.indices] and result.labels[0] != '0'


@pytest.fixture(scope='module')
def segmentation_run(tmp_path_factory):
    shapes = write_shapes_dataset(tmp_path_factory.mktemp('shapes'), 'folders', num_train=4, num_val=3,
                                  size=(40, 56), seed=0)
    task = SegmentationTask(SegmentationConfig(data=str(shapes), layout='folders', model='resnet10t', crop_size=40,
                                               short_side=40, drop_path_rate=0.))
    return _train_one_step(task, tmp_path_factory.mktemp('runs') / 'seg', batch_size=4), shapes


def test_segmentation(segmentation_run):
    run, shapes = segmentation_run
    predictor = hatnet.load(run, device='cpu')
    assert predictor.task == 'segmentation' and predictor.class_names == list(SHAPE_CLASSES)
    path = sorted((shapes / 'images' / 'val').iterdir())[0]
    width, height = Image.open(path).size
    results = predictor.predict(_three_ways(path))
    assert [type(r) for r in results] == [Segmentation] * 3 and results[0].image == str(path)
    for r in results:
        assert r.mask.shape == (height, width) and r.size == (width, height)
        assert r.mask.min() >= 0 and r.mask.max() < len(SHAPE_CLASSES) and r.class_names == list(SHAPE_CLASSES)
        assert np.array_equal(r.mask, results[0].mask)
    coloured = results[0].colorized()
    assert coloured.mode == 'P' and np.array_equal(np.asarray(coloured), results[0].mask)
    assert results[0].overlay().size == (width, height)
    assert set(results[0].to_dict()['classes']) <= set(SHAPE_CLASSES)

    metrics = predictor.evaluate(shapes)
    report = _cli_json('seg', 'eval', '--data', shapes, '--checkpoint', run, '--json', '--workers', 0)
    assert {k: v for k, v in report.items() if k not in ('checkpoint', 'csv')} == _as_json(metrics)
    assert metrics['images'] == 3 and list(metrics['per_class']) == list(SHAPE_CLASSES)


@pytest.fixture(scope='module')
def detection_run(tmp_path_factory):
    shapes = write_detection_shapes(tmp_path_factory.mktemp('coco'), train=4, val=2, size=(64, 80))
    task = DetectionTask(DetectionConfig(arch='maskrcnn', data=str(shapes), min_size=64, max_size=80, hflip=0.,
                                         roi_batch_size=64))
    return _train_one_step(task, tmp_path_factory.mktemp('runs') / 'det', batch_size=2), shapes


def test_detection(detection_run):
    run, shapes = detection_run
    predictor = hatnet.load(run, device='cpu', score_thresh=0., detections_per_img=5)
    names = [c['name'] for c in CATEGORIES]
    assert predictor.task == 'detection' and predictor.class_names == names
    path = sorted((shapes / 'val2017').glob('*.png'))[0]
    width, height = Image.open(path).size
    results = predictor.predict(_three_ways(path))
    assert [type(r) for r in results] == [Detection] * 3 and results[0].image == str(path)
    for r in results:
        n = len(r.labels)
        assert 0 < n <= 5 and r.boxes.shape == (n, 4) and r.scores.shape == (n,) and r.masks.shape == (n, height, width)
        assert r.masks.dtype == bool and list(r.scores) == sorted(r.scores, reverse=True)
        assert (r.boxes >= 0).all() and (r.boxes[:, 2] <= width).all() and (r.boxes[:, 3] <= height).all()
        assert set(r.labels) <= set(names)
        assert r.category_ids == [next(c['id'] for c in CATEGORIES if c['name'] == label) for label in r.labels]
        assert r.labels == results[0].labels
        np.testing.assert_allclose(r.boxes, results[0].boxes, atol=1e-3)
    assert results[0].draw().size == (width, height)
    assert len(results[0].to_dict()['detections']) == len(results[0].labels)

    metrics = predictor.evaluate(shapes, workers=0)
    report = _cli_json('det', 'eval', '--data', shapes, '--checkpoint', run, '--json', '--workers', 0,
                       '--device', 'cpu')
    assert report == _as_json(metrics) and {'bbox_AP', 'segm_AP'} <= set(metrics)


# task_state as hatnet wrote it before every task had one schema
OLD_SCHEMAS = dict(
    classification=lambda state: {k: state[k] for k in ('model', 'num_classes', 'class_names', 'data_config')},
    segmentation=lambda state: {k: state[k] for k in ('config', 'class_names', 'ignore_index', 'palette')},
    detection=lambda state: dict(config=state['config'], num_classes=len(state['class_names']) + 1,
                                 class_names=state['class_names'], category_ids=state['category_ids']),
)


@pytest.mark.parametrize('run_fixture', ['classification_run', 'segmentation_run', 'detection_run'])
def test_checkpoints_of_the_old_schema_still_load(run_fixture, request, tmp_path):
    run, _ = request.getfixturevalue(run_fixture)
    checkpoint = torch.load(run / 'best.pth', weights_only=True)
    new = hatnet.load(run, device='cpu')
    checkpoint['task_state'] = OLD_SCHEMAS[checkpoint['task']](checkpoint['task_state'])
    torch.save(checkpoint, tmp_path / 'old.pth')
    old = hatnet.load(tmp_path / 'old.pth', device='cpu')
    assert type(old) is type(new) and old.class_names == new.class_names
    image = np.random.default_rng(0).integers(0, 256, (48, 56, 3), dtype=np.uint8)
    assert old.predict(image)[0].to_dict() == new.predict(image)[0].to_dict()
