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
from hatnet.tasks.detection import Detection, DetectionConfig, DetectionTask, build_detector
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


# the options that make each run's predictions comparable
AMP_OPTIONS = dict(classification_run={}, segmentation_run={},
                   detection_run=dict(score_thresh=0., detections_per_img=5))


def _first_image(run_fixture, data):
    pattern = {'classification_run': 'val/red/*.png', 'segmentation_run': 'images/val/*',
               'detection_run': 'val2017/*.png'}[run_fixture]
    return sorted(data.glob(pattern))[0]


def _output_dtypes_of_convolutions(model):
    """A set that collects the dtype of every Conv2d output of ``model`` from now on (and the hooks' handles)."""
    dtypes = set()
    handles = [m.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return dtypes, handles


@pytest.mark.parametrize('run_fixture', ['classification_run', 'segmentation_run', 'detection_run'])
def test_amp_bf16_predicts_and_evaluates_under_autocast(run_fixture, request):
    run, data = request.getfixturevalue(run_fixture)
    exact = hatnet.load(run, device='cpu', **AMP_OPTIONS[run_fixture])
    fast = hatnet.load(run, device='cpu', amp='bf16', **AMP_OPTIONS[run_fixture])
    assert exact.amp == 'none' and fast.amp == 'bf16' and 'amp=bf16' in repr(fast)
    # the layout the trainer trains in: heads and decoders compute in NHWC too
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    image = _first_image(run_fixture, data)
    result, reference = fast.predict(image)[0], exact.predict(image)[0]
    # (a hook on HAT-Net's MLP convolutions makes it call them one by one instead of fused with the SiLUs)
    dtypes, handles = _output_dtypes_of_convolutions(fast.model)
    fast.predict(image)
    assert dtypes == {torch.bfloat16}  # every convolution ran in bf16
    dtypes.clear()
    fast.evaluate(data, workers=0)
    assert dtypes == {torch.bfloat16}
    for handle in handles:
        handle.remove()
    # the results are float32 and near the float32 model's
    if run_fixture == 'classification_run':
        by_class = dict(zip(reference.indices, reference.scores))
        assert all(abs(score - by_class[i]) < 0.03 for i, score in zip(result.indices, result.scores))
    elif run_fixture == 'segmentation_run':
        assert (result.mask == reference.mask).mean() > 0.9
    else:  # boxes decoded in float32, not on bf16's grid of 0.25-0.5 px at these sizes
        assert result.boxes.dtype == reference.boxes.dtype == np.float32
        assert result.masks.shape[1:] == reference.masks.shape[1:] and len(result.labels) == 5
    assert fast.predict(image)[0].to_dict() == result.to_dict()  # the model is left as it was


def test_detection_heads_decode_in_float32_under_autocast():
    torch.manual_seed(0)
    for arch in ('retinanet', 'maskrcnn'):
        config = DetectionConfig(arch=arch, min_size=64, max_size=80, score_thresh=0.)
        model = build_detector(config, 4).eval()
        image = torch.rand(3, 60, 70)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            output = model([image])[0]
        assert output['boxes'].dtype == output['scores'].dtype == torch.float32, arch
        # float32 boxes off bf16's grid: bf16 keeps 8 significant bits, every coordinate would be on it
        assert not torch.equal(output['boxes'], output['boxes'].bfloat16().float()), arch


def test_amp_on_the_command_line(classification_run, monkeypatch):
    run, folder = classification_run
    path = sorted((folder / 'val' / 'red').glob('*.png'))[0]
    expected = hatnet.load(run, device='cpu', amp='bf16').predict(path, top_k=2)[0].to_dict()
    assert _cli_json('predict', path, '--checkpoint', run, '--top-k', 2, '--json', '--amp', 'bf16') == [expected]
    with pytest.raises(hatnet.HatNetError, match="amp must be 'none', 'bf16' or 'fp16', got 'fp8'"):
        hatnet.load(run, device='cpu', amp='fp8')
    # a CPU without bf16 instructions runs bf16 in software: the user is told that float32 is faster
    monkeypatch.setattr('hatnet.tasks.predictor.cpu_emulates_bf16', lambda: True)
    with pytest.warns(UserWarning, match='no bf16 instructions'):
        hatnet.load(run, device='cpu', amp='bf16')
