"""Detectors, COCO evaluation, and the det commands (fast checks; the learning runs are in test_detection_slow)."""
import copy
import dataclasses
import json
import math
import random
import statistics

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import save_file

from detection_shapes import write_test_dataset
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from hatnet.cli import main
from hatnet.data.detection import CocoDetection, collate, detection_transforms
from hatnet.errors import CheckpointError, HatNetError
from hatnet.models.detection import maskrcnn_hat_net, retinanet_hat_net
from hatnet.engine import load_run_checkpoint
from hatnet.cli.train import recipe_for
from hatnet.engine import resolve_config
from hatnet.engine.fitting import apply_choices
from hatnet.tasks.detection import (DetectionConfig, DetectionTask, build_detector, coco_metrics, coco_results,
                                    fit_recipe)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_test_dataset(tmp_path_factory.mktemp('shapes'), train=6, val=3, size=(64, 80))


# ---------------------------------------------------------------------------------------------- models

def _level_shapes(model, size=(64, 96)):
    features = model.backbone(torch.rand(1, 3, *size))
    return {k: tuple(v.shape[1:]) for k, v in features.items()}


def test_roi_pooling_uses_the_backbone_strides_whatever_the_first_images():
    """torchvision guesses each level's scale from the first images it pools for: a 65 px tall image, padded
    to 96, would make that guess 2x off for good, and training and inference would pool different places."""
    model = maskrcnn_hat_net(4, min_size=65, max_size=80).eval()
    with torch.no_grad():
        model([torch.rand(3, 65, 80)])
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        assert (pool.map_levels.k_min, pool.map_levels.k_max) == (2, 5)


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


def _group_norms(module):
    return sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules())


def test_head_norm_gn_puts_group_norm_into_the_fpn_and_every_head():
    plain, normed = retinanet_hat_net(4, head_norm='none'), retinanet_hat_net(4, head_norm='gn')
    assert _group_norms(plain.backbone.fpn) == _group_norms(plain.head) == 0  # the paper's detectors
    assert _group_norms(normed.backbone.fpn) == 6  # the 3 lateral and 3 output convs (P6/P7 as before)
    assert _group_norms(normed.head) == 8  # 4 convs in each of the classification and box branches
    assert normed.head.classification_head.num_classes == 4
    assert normed.head.classification_head.num_anchors == plain.head.classification_head.num_anchors
    model = maskrcnn_hat_net(4, head_norm='gn')
    assert _group_norms(model.backbone.fpn) == 8
    assert _group_norms(model.roi_heads.box_head) == 4 and _group_norms(model.roi_heads.mask_head) == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(HatNetError, match="unknown head_norm 'bn': choose one of none, gn"):
        retinanet_hat_net(4, head_norm='bn')


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
@pytest.mark.parametrize('head_norm', ['none', 'gn'])
def test_a_few_steps_lower_the_loss(shapes, arch, head_norm):
    torch.manual_seed(0)
    task = DetectionTask(DetectionConfig(arch=arch, data=str(shapes), min_size=64, max_size=80, hflip=0.,
                                         roi_batch_size=64, head_norm=head_norm))
    train_set, _ = task.build_datasets()  # first: the model's number of classes comes from the data
    model = task.build_model().train()
    outputs = model.head.classification_head.num_classes if arch == 'retinanet' else \
        model.roi_heads.box_predictor.cls_score.out_features
    assert outputs == 1 + len(train_set.class_names)  # and the background
    batch = collate([train_set[i] for i in range(2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


def _noisy_results(dataset, seed=0):
    """The ground truth made imperfect: boxes jittered, scores random, some objects missed, some false alarms."""
    rng = random.Random(seed)
    results = []
    for image_id, out in _ground_truth_outputs(dataset):
        for r in coco_results(out, image_id, dataset.category_ids):
            if rng.random() < 0.2:
                continue
            x, y, w, h = r['bbox']
            r['bbox'] = [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3),
                         w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            r['score'] = rng.random()
            mask = mask_utils.decode(dict(r['segmentation'], counts=r['segmentation']['counts'].encode()))
            mask = np.roll(mask, (rng.randint(-2, 2), rng.randint(-2, 2)), axis=(0, 1))
            r['segmentation']['counts'] = mask_utils.encode(np.asfortranarray(mask))['counts'].decode()
            results.append(r)
            if rng.random() < 0.3:
                results.append(dict(copy.deepcopy(r), category_id=rng.choice(dataset.category_ids), score=rng.random()))
    return results


def _pycocotools_ap(annotation_file, results_file, iou_type):
    """COCO AP as pycocotools computes it from the files."""
    gt = COCO(str(annotation_file))
    evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[0]


def test_coco_metrics_leave_the_results_as_they_are_and_agree_with_pycocotools(shapes, tmp_path):
    dataset = CocoDetection(shapes, 'val2017', detection_transforms(train=False), with_masks=True)
    results = _noisy_results(dataset)
    before = copy.deepcopy(results)
    metrics = coco_metrics(dataset.coco.dataset, results, ('bbox', 'segm'))
    assert results == before  # loadRes got copies: no area, id, iscrowd or box polygons were added
    assert 0.1 < metrics['bbox_AP'] < 0.9 and 0.1 < metrics['segm_AP'] < 0.9
    (tmp_path / 'results.json').write_text(json.dumps(results))
    for iou_type in ('bbox', 'segm'):
        assert metrics[f'{iou_type}_AP'] == pytest.approx(
            _pycocotools_ap(dataset.annotation_file, tmp_path / 'results.json', iou_type), abs=1e-6)


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


def _write_annotations(root, sizes, objects_per_image, object_side):
    """A train split's json only (the auto recipe reads nothing else): images of ``sizes`` (width, height) with
    ``objects_per_image`` square boxes of ``object_side`` pixels each."""
    (root / 'train2017').mkdir(parents=True)
    (root / 'annotations').mkdir()
    images = [dict(id=i, file_name=f'{i}.jpg', width=w, height=h) for i, (w, h) in enumerate(sizes, start=1)]
    annotations = [dict(id=len(images) * k + i, image_id=i, category_id=1, bbox=[1, 1, object_side, object_side],
                        iscrowd=0, area=object_side ** 2) for i in range(1, len(images) + 1)
                   for k in range(objects_per_image)]
    (root / 'annotations' / 'instances_train2017.json').write_text(json.dumps(dict(
        images=images, annotations=annotations, categories=[dict(id=1, name='thing')])))
    return root


def fitted(data, device='cpu', **options):
    """The settings of ``hatnet det train --recipe auto`` with ``options``, and the auto recipe's choices."""
    options = dict(data=str(data), out='o', **options)
    train_cfg, task_cfg = resolve_config(DetectionConfig, options, *recipe_for('det', 'auto', options))
    choices = fit_recipe(task_cfg, train_cfg, frozenset(options), torch.device(device))
    assert all(c.why for c in choices)
    apply_choices(train_cfg, task_cfg, choices, options)
    return train_cfg, task_cfg, {c.key: c.value for c in choices}


def paper_configs(arch):
    options = dict(arch=arch, data='d', out='o')
    return resolve_config(DetectionConfig, options, *recipe_for('det', 'paper', options))


@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_auto_recipe_keeps_the_paper_recipe_for_coco_sized_data(tmp_path, arch):
    sizes = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 512)]  # COCO's typical photos
    data = _write_annotations(tmp_path, sizes * 20, objects_per_image=7, object_side=60)
    train_cfg, task_cfg, choices = fitted(data, arch=arch)
    paper_train, paper_task = paper_configs(arch)
    assert choices == {}
    assert (train_cfg, dataclasses.replace(task_cfg, data='d')) == (paper_train, paper_task)


def test_auto_recipe_on_small_images_trains_at_their_scale_with_a_short_schedule(shapes):
    data = json.loads((shapes / 'annotations' / 'instances_train2017.json').read_text())
    annotated = {a['image_id'] for a in data['annotations']}
    sides = [(min(i['width'], i['height']), max(i['width'], i['height']))
             for i in data['images'] if i['id'] in annotated]
    paper_train, paper_task = paper_configs('maskrcnn')
    train_cfg, task_cfg, choices = fitted(shapes, arch='maskrcnn')
    # the images' own scale, not 800 px
    assert task_cfg.min_size == round(statistics.median(s for s, _ in sides))
    assert task_cfg.max_size == max(long for _, long in sides)
    # a run of a few hundred steps, with the recipe's lr steps at the same fractions and a warm-up within it
    assert train_cfg.epochs == 0 and 0 < train_cfg.iters <= 600
    paper_fractions = [m / paper_train.epochs for m in paper_train.decay_milestones]
    assert [m / train_cfg.iters for m in train_cfg.decay_milestones] == pytest.approx(paper_fractions, abs=0.01)
    assert train_cfg.warmup_epochs == 0 and 0 < train_cfg.warmup_iters <= train_cfg.iters // 10
    assert train_cfg.iters // train_cfg.eval_every >= 2  # the best checkpoint is chosen among evaluations
    # from scratch: a larger lr than the paper's fine-tuning one; fewer sampled RoIs for a few objects per image
    assert train_cfg.lr > paper_train.lr and task_cfg.roi_batch_size < paper_task.roi_batch_size
    # and normalised heads, no stochastic depth, clipped gradients (the paper's detectors: none of them)
    assert (task_cfg.head_norm, task_cfg.drop_path_rate, train_cfg.clip_grad) == ('gn', 0.0, 1.0)
    assert (paper_task.head_norm, paper_task.drop_path_rate, paper_train.clip_grad) == ('none', 0.1, None)


def test_auto_recipe_keeps_what_the_user_gave_and_fits_the_rest_to_it(shapes):
    train_cfg, task_cfg, choices = fitted(shapes, batch_size=8, iters=300, min_size=64)
    assert {'batch_size', 'iters', 'epochs', 'min_size', 'decay_milestones'}.isdisjoint(choices)
    assert (train_cfg.batch_size, train_cfg.iters, task_cfg.min_size) == (8, 300, 64)
    assert train_cfg.decay_milestones == [200, 275]  # the recipe's, moved to the given length
    assert train_cfg.warmup_iters == 30  # a tenth of the given length
    lr_at_4 = fitted(shapes, batch_size=4)[0].lr
    assert train_cfg.lr > lr_at_4  # lr follows the given batch
    # pretrained backbone: the paper's lr, scaled linearly from batch 16
    train_cfg, task_cfg, _ = fitted(shapes, batch_size=8, pretrained='weights.pth')
    assert train_cfg.lr == pytest.approx(paper_configs('retinanet')[0].lr * 8 / 16)
    assert (task_cfg.head_norm, task_cfg.drop_path_rate, train_cfg.clip_grad) == ('none', 0.1, None)
    assert fitted(shapes, head_norm='none')[1].head_norm == 'none'


def test_auto_recipe_on_a_gpu_batches_more_images_and_keeps_at_least_12_epochs(shapes):
    train_cfg, _, _ = fitted(shapes, device='cuda')
    assert train_cfg.batch_size == 16  # many 64-80 px images fit in the paper's per-GPU pixels
    assert train_cfg.iters >= 600 and train_cfg.warmup_iters <= train_cfg.iters // 10


def test_auto_recipe_shrinks_the_anchors_for_small_objects(tmp_path):
    data = _write_annotations(tmp_path, [(120, 100)] * 50, objects_per_image=3, object_side=10)
    _, task_cfg, choices = fitted(data)
    assert task_cfg.anchor_size <= 10 and choices['anchor_size'] == task_cfg.anchor_size
    detector = build_detector(task_cfg, num_classes=2)
    assert detector.anchor_generator.sizes[0][0] == task_cfg.anchor_size
    assert fitted(_write_annotations(tmp_path / 'big', [(120, 100)] * 50, 3, 40))[1].anchor_size == 32


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
    """One short training run per detector, through the command line (Mask R-CNN's with GroupNorm heads, which
    every command that loads the run must rebuild)."""
    out = tmp_path_factory.mktemp('runs')
    for arch, head_norm in (('retinanet', 'none'), ('maskrcnn', 'gn')):
        run(['det', 'train', '--arch', arch, '--data', str(shapes), '--out', str(out / arch), '--iters', '1',
             '--recipe', 'paper', '--set', f'head_norm={head_norm}', '--threads', '1', '--batch-size', '2',
             '--min-size', '64', '--max-size', '80', '--workers', '0', '--device', 'cpu'])
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
    # the results file holds the model's detections in COCO's results format, nothing loadRes adds
    detections = json.loads((runs / f'{arch}_results.json').read_text())
    keys = {'image_id', 'category_id', 'bbox', 'score'} | ({'segmentation'} if arch == 'maskrcnn' else set())
    assert all(set(d) == keys for d in detections) and (detections or arch == 'retinanet')
    annotation_file = shapes / 'annotations' / 'instances_val2017.json'
    for iou_type in ('bbox', 'segm') if arch == 'maskrcnn' and detections else ('bbox',) if detections else ():
        assert metrics[f'{iou_type}_AP'] == pytest.approx(
            _pycocotools_ap(annotation_file, runs / f'{arch}_results.json', iou_type), abs=1e-6)


def test_eval_gives_the_numbers_the_trainer_logged(runs, shapes, capsys):
    capsys.readouterr()
    run(['det', 'eval', '--data', str(shapes), '--checkpoint', str(runs / 'maskrcnn'), '--json', '--workers', '0',
         '--device', 'cpu'])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics['bbox_AP'] == pytest.approx(load_run_checkpoint(runs / 'maskrcnn').metrics['val_bbox_AP'], abs=1e-6)


def test_the_metrics_do_not_depend_on_how_the_images_are_batched(runs, shapes):
    # images of different sizes: a batch of three is padded to its largest, which one image alone is not
    predictor = DetectionTask.load(runs / 'maskrcnn', 'cpu')
    alone, batched = (predictor.evaluate(shapes, batch_size=size, workers=0) for size in (1, 3))
    assert alone == pytest.approx(batched, rel=0, abs=0, nan_ok=True)


def test_predict_writes_pngs_and_json(runs, shapes, tmp_path):
    images = sorted((shapes / 'val2017').glob('*.png'))[:2]
    out = tmp_path / 'pred'
    run(['det', 'predict', *map(str, images), '--checkpoint', str(runs / 'maskrcnn'), '--out', str(out),
          '--score-thresh', '0', '--max-detections', '3', '--device', 'cpu'])
    entries = json.loads((out / 'predictions.json').read_text())
    assert [e['image'] for e in entries] == list(map(str, images))
    assert [e['file_name'] for e in entries] == [i.name for i in images] and [e['image_id'] for e in entries] == [1, 2]
    for entry, image in zip(entries, images):
        with Image.open(entry['drawing']) as drawn:
            assert drawn.format == 'PNG' and drawn.size == Image.open(image).size
        assert len(entry['detections']) == 3
        for d in entry['detections']:
            assert d['label'] in ('circle', 'square', 'triangle') and len(d['bbox']) == 4
            assert d['segmentation']['size'] == [Image.open(image).height, Image.open(image).width]


def test_predict_takes_image_ids_from_a_coco_json_and_writes_coco_results(runs, shapes, tmp_path, capsys):
    annotation_file = shapes / 'annotations' / 'instances_val2017.json'
    listed = {i['file_name']: i['id'] for i in json.loads(annotation_file.read_text())['images']}
    images = sorted((shapes / 'val2017').glob('*.png'))[1:3]
    run(['det', 'predict', *map(str, images), '--checkpoint', str(runs / 'maskrcnn'), '--out', str(tmp_path / 'pred'),
         '--score-thresh', '0', '--max-detections', '2', '--device', 'cpu', '--annotations', str(annotation_file),
         '--results', str(tmp_path / 'results.json')])
    entries = json.loads((tmp_path / 'pred' / 'predictions.json').read_text())
    assert [e['image_id'] for e in entries] == [listed[i.name] for i in images]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert len(results) == 4 and {r['image_id'] for r in results} == {listed[i.name] for i in images}
    # each result is the prediction's own detection, with its image id and without the class name
    assert sorted((r['image_id'], r['score']) for r in results) == sorted(
        (e['image_id'], d['score']) for e in entries for d in e['detections'])
    COCO(str(annotation_file)).loadRes(str(tmp_path / 'results.json'))  # a results file pycocotools reads
    with pytest.raises(SystemExit):
        run(['det', 'predict', str(runs / 'maskrcnn' / 'curves.png'), '--checkpoint', str(runs / 'maskrcnn'),
             '--out', str(tmp_path / 'other'), '--device', 'cpu', '--annotations', str(annotation_file)])
    assert "lists no image(s) named 'curves.png'" in capsys.readouterr().err


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
    assert 'without best.pth' in capsys.readouterr().err


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


def test_drawn_labels_are_filled_and_sized_to_the_image_and_nothing_warns(recwarn):
    import numpy as np
    from PIL import Image

    from hatnet.tasks.detection import Detection, _category_colour
    for side in (80, 1600):
        photo = Image.new('RGB', (side, side), (128, 128, 128))
        box = np.array([[0.25 * side, 0.5 * side, 0.75 * side, 0.9 * side]], np.float32)
        drawn = np.asarray(Detection('x.png', box, ['square'], [2], np.array([0.9]), None, picture=photo).draw())
        colour = np.array(_category_colour(2))
        label = (drawn[:int(0.5 * side)] == colour).all(-1)  # above the box: the filled label
        rows = np.flatnonzero(label.any(1))
        assert rows.size and rows.max() - rows.min() + 1 >= max(12, 0.03 * side)  # readable at any size
        empty = Detection('x.png', np.zeros((0, 4), np.float32), [], [], np.zeros(0), None, picture=photo).draw()
        assert np.array_equal(np.asarray(empty), np.asarray(photo))
    assert not [w for w in recwarn if 'box' in str(w.message).lower()]
