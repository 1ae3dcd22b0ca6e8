"""Detectors, COCO evaluation, and the det commands (fast checks; the learning runs are in test_detection_slow)."""
import copy
import json
import math

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from detection_shapes import write_shapes_dataset
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from hatnet.cli import main
from hatnet.data.detection import CocoDetection, collate, detection_transforms
from hatnet.errors import CheckpointError, HatNetError
from hatnet.models.detection import maskrcnn_hat_net, retinanet_hat_net
from hatnet.engine import load_run_checkpoint
from hatnet.cli.train import recipe_for
from hatnet.engine import resolve_config
from hatnet.tasks.detection import DetectionConfig, DetectionTask, coco_metrics, coco_results


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('shapes'), train=6, val=3, size=(64, 80))


# ---------------------------------------------------------------------------------------------- models

def _level_shapes(model, size=(64, 96)):
    features = model.backbone(torch.rand(1, 3, *size))
    return {k: tuple(v.shape[1:]) for k, v in features.items()}


def test_retinanet_uses_stages_2_to_4_and_p6_p7():
    model = retinanet_hat_net(num_classes=4, drop_path_rate=0.)
    assert _level_shapes(model) == {'0': (256, 8, 12), '1': (256, 4, 6), '2': (256, 2, 3), 'p6': (256, 1, 2),
                                    'p7': (256, 1, 1)}
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 384  # from C5, not P5 ('on input')
    assert model.head.classification_head.num_classes == 4


def test_maskrcnn_uses_all_stages_and_max_pooled_p6():
    model = maskrcnn_hat_net(num_classes=4)
    assert _level_shapes(model) == {'0': (256, 16, 24), '1': (256, 8, 12), '2': (256, 4, 6), '3': (256, 2, 3),
                                    'pool': (256, 1, 2)}
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


def test_frozen_stages_and_group_norms_kept():
    model = retinanet_hat_net(num_classes=3, frozen_stages=2)
    body = model.backbone.body
    frozen = {name.split('.')[0] for name, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {'stem', 'stages_0', 'stages_1'}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    norms = [m for m in body.modules() if 'Norm' in type(m).__name__]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) for m in norms)  # nothing became a frozen BatchNorm
    with pytest.raises(HatNetError, match='cannot freeze 5 stages: the model has 4'):
        retinanet_hat_net(num_classes=3, frozen_stages=5)


def test_backbone_loads_imagenet_weights(tmp_path):
    reference = timm.create_model('hat_net_tiny')
    path = tmp_path / 'hat_net_tiny.safetensors'
    save_file(reference.state_dict(), str(path))
    model = maskrcnn_hat_net(num_classes=3, pretrained_backbone=str(path))
    loaded = model.backbone.body.stages_2.blocks[0].attn.qkv.weight
    assert torch.equal(loaded, reference.stages[2].blocks[0].attn.qkv.weight)
    (tmp_path / 'bad.pth').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='bad.pth'):
        retinanet_hat_net(num_classes=3, pretrained_backbone=str(tmp_path / 'bad.pth'))


def test_a_wrong_checkpoint_for_another_timm_backbone_is_one_clear_error(tmp_path):
    resnet = timm.create_model('resnet18').state_dict()
    del resnet['layer2.0.conv1.weight']
    torch.save(resnet, tmp_path / 'resnet18.pth')
    with pytest.raises(CheckpointError, match=r'resnet18\.pth does not fit resnet18: 1 weights missing, '
                                              r"e\.g\. \['layer2\.0\.conv1\.weight'\]"):
        retinanet_hat_net(num_classes=3, backbone='resnet18', pretrained_backbone=tmp_path / 'resnet18.pth')
    torch.save(timm.create_model('hat_net_tiny').state_dict(), tmp_path / 'hat_net_tiny.pth')
    with pytest.raises(CheckpointError, match=r'hat_net_tiny\.pth does not fit resnet18'):
        maskrcnn_hat_net(num_classes=3, backbone='resnet18', pretrained_backbone=tmp_path / 'hat_net_tiny.pth')


def test_any_timm_backbone_and_inference_limits():
    model = retinanet_hat_net(num_classes=3, backbone='resnet18', score_thresh=0.2, detections_per_img=5).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 70, 90)])[0]
    assert len(out['boxes']) <= 5 and bool((out['scores'] >= 0.2).all())
    assert bool((out['boxes'][:, 2] <= 90).all() and (out['boxes'][:, 3] <= 70).all())  # input image's pixels
    with pytest.raises(HatNetError, match="unknown model 'no_such_net'"):
        retinanet_hat_net(num_classes=3, backbone='no_such_net')


@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_a_few_steps_lower_the_loss(shapes, arch):
    torch.manual_seed(0)
    task = DetectionTask(DetectionConfig(arch=arch, data=str(shapes), min_size=64, max_size=80, hflip=0.,
                                         roi_batch_size=64))
    train_set, _ = task.build_datasets()  # first: the model's number of classes comes from the data
    model = task.build_model().train()
    outputs = model.head.classification_head.num_classes if arch == 'retinanet' else \
        model.roi_heads.box_predictor.cls_score.out_features
    assert outputs == 1 + len(train_set.class_names)  # and the background
    batch = collate([train_set[i] for i in range(2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(4):
        loss, scalars = task.train_step(model, batch, torch.device('cpu'))
        assert ('loss_mask' in scalars) == (arch == 'maskrcnn') and loss.item() == pytest.approx(sum(scalars.values()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------- evaluation

def _ground_truth_outputs(dataset):
    """Detector-style outputs that reproduce the ground truth exactly (score 1)."""
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target['labels'])
        yield target['image_id'], dict(boxes=target['boxes'].as_subclass(torch.Tensor), labels=target['labels'],
                                       scores=torch.ones(n), masks=target['masks'][:, None].float())


def test_perfect_detections_score_1_and_shifted_boxes_score_lower(shapes):
    dataset = CocoDetection(shapes, 'val2017', detection_transforms(train=False), with_masks=True)
    results = [r for image_id, out in _ground_truth_outputs(dataset)
               for r in coco_results(out, image_id, dataset.category_ids)]
    assert {r['category_id'] for r in results} <= {3, 7, 9}
    metrics = coco_metrics(dataset.coco.dataset, results, ('bbox', 'segm'))
    assert metrics['bbox_AP'] == pytest.approx(1.0) and metrics['segm_AP'] == pytest.approx(1.0)
    assert metrics['bbox_AP50'] == pytest.approx(1.0) and math.isnan(metrics['bbox_APl'])  # no large objects

    shifted = copy.deepcopy(results)
    for r in shifted:
        r['bbox'][0] += 0.3 * r['bbox'][2]  # IoU 0.7 / 1.3 = 0.54: counts at IoU 0.5 only
    metrics = coco_metrics(dataset.coco.dataset, shifted, ('bbox',))
    assert metrics['bbox_AP50'] == pytest.approx(1.0)
    assert metrics['bbox_AP75'] == 0.0
    assert metrics['bbox_AP'] == pytest.approx(0.1)  # 1 of the 10 IoU thresholds 0.50:0.95

    wrong_class = [dict(r, category_id=3 if r['category_id'] != 3 else 7) for r in results]
    assert coco_metrics(dataset.coco.dataset, wrong_class, ('bbox',))['bbox_AP'] == 0.0
    assert coco_metrics(dataset.coco.dataset, [], ('bbox', 'segm'))['segm_AP'] == 0.0


# ---------------------------------------------------------------------------------------------- settings

def detection_configs(options):
    """The settings ``hatnet det train`` resolves from its options (no recipe given)."""
    return resolve_config(DetectionConfig, options, *recipe_for('det', None, options))


def test_default_recipe_per_arch_and_rescaled_schedule():
    train_cfg, task_cfg = detection_configs(dict(arch='maskrcnn', data='d', out='o', iters=300))
    assert (task_cfg.arch, train_cfg.lr, train_cfg.weight_decay) == ('maskrcnn', 2e-4, 1e-4)
    assert (train_cfg.epochs, train_cfg.iters, train_cfg.decay_milestones) == (0, 300, [200, 275])
    assert train_cfg.eval_every == 25  # 12 evaluations, as in the 12-epoch recipe
    train_cfg, task_cfg = detection_configs(dict(data='d', out='o', epochs=24))
    assert (task_cfg.arch, train_cfg.lr, train_cfg.decay_milestones) == ('retinanet', 1e-4, [16, 22])
    assert train_cfg.eval_every == 1
    train_cfg, _ = detection_configs(dict(data='d', out='o'))
    assert (train_cfg.epochs, train_cfg.decay_milestones, train_cfg.batch_size) == (12, [8, 11], 2)


# ---------------------------------------------------------------------------------------------- commands

def run(args):
    """``hatnet ARGS``; returns normally when the command succeeds."""
    try:
        main(args)
    except SystemExit as e:
        if e.code:
            raise

@pytest.fixture(scope='module')
def runs(shapes, tmp_path_factory):
    """One short training run per detector, through the command line."""
    out = tmp_path_factory.mktemp('runs')
    for arch in ('retinanet', 'maskrcnn'):
        run(['det', 'train', '--arch', arch, '--data', str(shapes), '--out', str(out / arch), '--iters', '1',
              '--batch-size', '2', '--min-size', '64', '--max-size', '80', '--workers', '0', '--device', 'cpu'])
    return out


@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_train_then_eval_json(runs, shapes, arch, capsys):
    capsys.readouterr()
    run(['det', 'eval', '--data', str(shapes), '--checkpoint', str(runs / arch), '--json', '--workers', '0',
          '--device', 'cpu', '--results', str(runs / f'{arch}_results.json')])
    metrics = json.loads(capsys.readouterr().out)
    expected = {'bbox_AP', 'bbox_AP50'} | ({'segm_AP'} if arch == 'maskrcnn' else set())
    assert expected <= set(metrics) and all(0 <= metrics[k] <= 1 for k in expected)
    assert ('segm_AP' in metrics) == (arch == 'maskrcnn')
    # the same numbers the trainer logged for its best checkpoint
    assert metrics['bbox_AP'] == pytest.approx(load_run_checkpoint(runs / arch).metrics['val_bbox_AP'], abs=1e-6)
    detections = json.loads((runs / f'{arch}_results.json').read_text())
    assert all({'image_id', 'category_id', 'bbox', 'score'} <= set(d) for d in detections)


def test_predict_writes_pngs_and_json(runs, shapes, tmp_path):
    images = sorted((shapes / 'val2017').glob('*.png'))[:2]
    out = tmp_path / 'pred'
    run(['det', 'predict', *map(str, images), '--checkpoint', str(runs / 'maskrcnn'), '--out', str(out),
          '--score-thresh', '0', '--max-detections', '3', '--device', 'cpu'])
    entries = json.loads((out / 'predictions.json').read_text())
    assert [e['image'] for e in entries] == list(map(str, images))
    for entry, image in zip(entries, images):
        with Image.open(entry['drawing']) as drawn:
            assert drawn.format == 'PNG' and drawn.size == Image.open(image).size
        assert len(entry['detections']) == 3
        for d in entry['detections']:
            assert d['label'] in ('rectangle', 'triangle', 'disc') and len(d['bbox']) == 4
            assert d['segmentation']['size'] == [64, 80]


def test_command_errors_are_one_line(runs, shapes, tmp_path, capsys):
    (tmp_path / 'broken.png').write_bytes(b'no image')
    with pytest.raises(SystemExit) as info:
        run(['det', 'predict', str(tmp_path / 'broken.png'), '--checkpoint', str(runs / 'retinanet'),
              '--out', str(tmp_path / 'pred'), '--device', 'cpu'])
    assert info.value.code == 2 and 'cannot read image' in capsys.readouterr().err
    assert not (tmp_path / 'pred').exists()  # nothing written
    with pytest.raises(SystemExit):
        run(['det', 'eval', '--data', str(tmp_path), '--checkpoint', str(runs / 'retinanet'), '--device', 'cpu'])
    assert "image folder of split 'val2017' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(['det', 'eval', '--data', str(shapes), '--checkpoint', str(tmp_path), '--device', 'cpu'])
    assert 'has no best.pth' in capsys.readouterr().err


def test_train_with_a_wrong_backbone_checkpoint_stops_before_writing(shapes, tmp_path, capsys):
    torch.save(timm.create_model('hat_net_tiny').state_dict(), tmp_path / 'hat_net_tiny.pth')
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(['det', 'train', '--model', 'resnet18', '--pretrained', str(tmp_path / 'hat_net_tiny.pth'),
              '--data', str(shapes), '--out', str(tmp_path / 'run'), '--iters', '1', '--batch-size', '2',
              '--workers', '0', '--device', 'cpu'])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and 'hat_net_tiny.pth does not fit resnet18' in err[0]
    assert not (tmp_path / 'run').exists()
