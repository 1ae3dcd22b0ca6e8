"""``hatnet export`` of every kind of run the train commands write: classifiers, Semantic FPN, RetinaNet and
Mask R-CNN, each checked in onnxruntime against PyTorch at several input sizes.

The runs are models built as the tasks build them and saved as the trainer saves its best checkpoint (the
training itself is tested elsewhere); the detectors' heads get larger random weights so that their scores
spread out and the detections are not a tie of 100 equal scores.
"""
import json
from dataclasses import asdict

import onnx
import onnxruntime as ort
import pytest
import torch

from hatnet.cli import main
from hatnet.engine.checkpoint import FORMAT
from hatnet.export import match_detections
from hatnet.export.onnx import OnnxRunner
from hatnet.models.factory import create
from hatnet.models.semantic_fpn import SemanticFPN
from hatnet.tasks.classification import eval_data_config
from hatnet.tasks.detection import DetectionConfig, build_detector
from hatnet.tasks.segmentation import HEADS, SegmentationConfig, build_segmenter

TOLERANCE = 1e-4


def save_run(run_dir, task, task_state, model):
    """A run directory with ``best.pth`` as the trainer writes it."""
    run_dir.mkdir(parents=True)
    torch.save(dict(format=FORMAT, task=task, task_state=task_state, metrics={}, epoch=1, step=1, config={},
                    model=model.state_dict(), weights='model'), run_dir / 'best.pth')
    return run_dir


def classification_run(run_dir, model_name, classes):
    torch.manual_seed(0)
    model = create(model_name, num_classes=len(classes))
    state = dict(model=model_name, class_names=classes, config={}, num_classes=len(classes),
                 data_config=eval_data_config(model_name, 64))
    return save_run(run_dir, 'classification', state, model)


def segmentation_run(run_dir, backbone, classes, spread_logits=False, head='fpn'):
    torch.manual_seed(0)
    model = build_segmenter(head, backbone, len(classes))
    if spread_logits:  # logits far apart: a stable argmax for comparing label maps
        torch.nn.init.normal_(model.classifier.weight, std=0.5)
    config = asdict(SegmentationConfig(model=backbone, num_classes=len(classes), head=head))
    state = dict(model=backbone, class_names=classes, config=config, ignore_index=255,
                 palette=[[i, i, i] for i in range(len(classes))])
    return save_run(run_dir, 'segmentation', state, model)


def detection_run(run_dir, arch, head_norm='none'):
    torch.manual_seed(0)
    config = DetectionConfig(arch=arch, min_size=96, max_size=128, detections_per_img=30, head_norm=head_norm)
    model = build_detector(config, 4)
    head = model.head.classification_head.cls_logits if arch == 'retinanet' else \
        model.roi_heads.box_predictor.cls_score
    torch.nn.init.normal_(head.weight, std=0.3)
    state = dict(model=config.model, class_names=['a', 'b', 'c'], config=asdict(config), category_ids=[1, 2, 3])
    return save_run(run_dir, 'detection', state, model)


def export(*args):
    """``hatnet export ARGS``; (exit code, stdout + stderr)."""
    try:
        main(['export', *map(str, args)])
    except SystemExit as e:
        return e.code or 0
    return 0


def metadata(path):
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


# ---------------------------------------------------------------------------------------------- fast

@pytest.fixture(scope='module')
def resnet_segmentation(tmp_path_factory):
    """A segmentation run of each head."""
    return {head: segmentation_run(tmp_path_factory.mktemp(head) / 'run', 'resnet10t', ['sky', 'road', 'car'],
                                   spread_logits=True, head=head) for head in HEADS}


@pytest.mark.parametrize('head', HEADS)
@pytest.mark.parametrize('seg_output', ['logits', 'labels'])
def test_segmentation_run_exports_logits_or_labels(resnet_segmentation, tmp_path, head, seg_output, capsys):
    path = tmp_path / 'seg.onnx'
    run = resnet_segmentation[head]
    assert export(run, '--onnx', path, '--seg-output', seg_output, '--check-size', '64x96') == 0
    model = build_segmenter(head, 'resnet10t', 3).eval()
    model.load_state_dict(torch.load(run / 'best.pth', weights_only=True)['model'])
    runner = OnnxRunner(path)
    for shape in [(1, 3, 97, 65), (3, 3, 128, 160)]:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            logits = model(images)
        output = runner(images)
        if seg_output == 'logits':
            assert output.shape == logits.shape and (output - logits).abs().max().item() <= TOLERANCE
        else:
            assert output.dtype == torch.int64 and output.shape == (shape[0], *shape[2:])
            assert torch.equal(output, logits.argmax(1))
    info = metadata(path)
    assert info['hatnet.task'] == 'segmentation' and json.loads(info['hatnet.class_names']) == ['sky', 'road', 'car']
    assert info['hatnet.output'] == seg_output and len(json.loads(info['hatnet.mean'])) == 3


def test_classification_run_of_another_timm_model(tmp_path, capsys):
    """Any head: a resnet with 5 classes, exported from its run directory."""
    run = classification_run(tmp_path / 'run', 'resnet10t', list('abcde'))
    path = tmp_path / 'cls.onnx'
    assert export(run, '--onnx', path, '--check-size', '64') == 0
    model = create('resnet10t', run, num_classes=5).eval()
    images = torch.randn(3, 3, 75, 90, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(images)
    assert (OnnxRunner(path)(images) - expected).abs().max().item() <= TOLERANCE
    assert json.loads(metadata(path)['hatnet.class_names']) == list('abcde')


def test_bad_export_options_are_one_line_and_write_nothing(resnet_segmentation, tmp_path, capsys):
    run = resnet_segmentation['fpn']
    path = tmp_path / 'x.onnx'
    assert export(run, '--onnx', path, '--seg-output', 'probabilities') == 2
    err = capsys.readouterr().err
    assert "unknown --seg-output 'probabilities'" in err and 'Traceback' not in err and len(err.splitlines()) == 1
    assert not path.exists()
    path.write_text('mine')
    assert export(run, '--onnx', path) == 2
    assert 'Traceback' not in capsys.readouterr().err and path.read_text() == 'mine'  # not overwritten


# ---------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_hat_net_segmentation_run_exports_with_dynamic_sizes(tmp_path, capsys):
    run = segmentation_run(tmp_path / 'run', 'hat_net_tiny', ['a', 'b', 'c', 'd'])
    path = tmp_path / 'seg.onnx'
    assert export(run, '--onnx', path, '--check-size', '64') == 0
    model = SemanticFPN('hat_net_tiny', 4).eval()
    model.load_state_dict(torch.load(run / 'best.pth', weights_only=True)['model'])
    runner = OnnxRunner(path)
    for shape in [(2, 3, 250, 333), (1, 3, 97, 65), (1, 3, 512, 384)]:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            expected = model(images)
        assert (runner(images) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize('arch, head_norm', [('retinanet', 'none'), ('maskrcnn', 'gn')])
def test_detection_run_exports_with_pre_and_post_processing(tmp_path, arch, head_norm, capsys):
    import hatnet

    run = detection_run(tmp_path / 'run', arch, head_norm)
    path = tmp_path / f'{arch}.onnx'
    assert export(run, '--onnx', path, '--check-size', '96x128') == 0
    assert '0 unpaired' in capsys.readouterr().out
    detector = hatnet.load(run, device='cpu').model
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    names = [output.name for output in session.get_outputs()]
    assert names == ['boxes', 'labels', 'scores'] + (['masks'] if arch == 'maskrcnn' else [])
    found = 0
    # sizes that the resize scales up and down, odd sides, portrait and landscape
    for size in [(70, 90), (250, 333), (97, 65), (300, 120)]:
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.inference_mode():
            expected = detector([image])[0]
        actual = dict(zip(names, map(torch.from_numpy, session.run(None, {'image': image.numpy()}))))
        diff = match_detections(expected, actual)
        assert diff['unmatched'] == 0 and len(actual['boxes']) == len(expected['boxes'])
        assert diff['boxes'] <= 1e-2 and diff['scores'] <= 1e-4  # pixels; scores in [0, 1]
        if arch == 'maskrcnn':
            assert actual['masks'].shape[-2:] == size and diff['masks'] <= 1e-2
        inside = (actual['boxes'][:, 2] <= size[1] + 1e-3) & (actual['boxes'][:, 3] <= size[0] + 1e-3)
        assert bool(inside.all())  # in the input image's pixels (clipped, then scaled back in float32)
        found += len(actual['boxes'])
    assert found > 0
    info = metadata(path)
    assert info['hatnet.task'] == 'detection' and json.loads(info['hatnet.category_ids']) == [1, 2, 3]
