"""Object detection (RetinaNet) and instance segmentation (Mask R-CNN) as a :class:`hatnet.engine.Task`.

Also the pieces evaluation and prediction share with training: turning the detector's outputs into COCO
results and COCO evaluation (faster-coco-eval, the pycocotools algorithm). Inference: ``DetectionTask.load(run)``
(or ``hatnet.load``) -> :class:`DetectionPredictor`, whose ``predict(images)`` gives a :class:`Detection` (boxes,
class names, scores, masks) per image.
"""
import copy
import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from faster_coco_eval import COCO as EvalCOCO
from faster_coco_eval import COCOeval_faster
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.detection import CocoDetection, check_same_categories, collate, detection_transforms, split_paths
from ..drawing import draw_label, font_for
from ..engine import Task, load_weights, worker_errors_unwrapped
from ..engine import distributed as dist
from ..engine.fitting import Choice, launched_processes
from ..engine.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, Range, TrainConfig, check_ranges
from ..errors import DatasetError
from ..fileio import write_csv_atomic, write_text_atomic
from ..models.detection import ANCHOR_SIZE, check_arch, check_head_norm, create_detector
from .predictor import Images, Prediction, Predictor, check_resized_size, read_inputs, read_run

__all__ = ['COCO_STATS', 'DataStats', 'Detection', 'DetectionConfig', 'DetectionPredictor', 'DetectionTask',
           'build_detector', 'coco_metrics', 'coco_results', 'data_stats', 'fit_recipe', 'image_ids_for', 'iou_types',
           'predict_coco', 'write_csv', 'write_json']

_logger = logging.getLogger(__name__)

# the first six numbers of COCOeval.summarize(), in order
COCO_STATS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
MASK_THRESHOLD = 0.5  # Mask R-CNN's mask probabilities -> binary masks


@dataclass
class DetectionConfig:
    """The detection task's own options (recipe keys besides the trainer's)."""
    arch: str = 'retinanet'                 # retinanet | maskrcnn
    data: str = ''                          # dataset folder in the COCO 2017 layout
    train_split: str = 'train2017'
    val_split: str = 'val2017'
    model: str = 'hat_net_tiny'             # backbone: any hat_net variant or timm features_only model
    pretrained: Optional[str] = None        # ImageNet checkpoint for the backbone (.pth or .safetensors)
    frozen_stages: int = 0                  # freeze the backbone stem and first N stages
    drop_path_rate: float = 0.1
    head_norm: str = 'none'                 # none (the paper's detectors) | gn: GroupNorm in the FPN and heads
    min_size: int = 800                     # shorter image side (inference; training unless multi_scale)
    max_size: int = 1333                    # cap on the longer side
    multi_scale: List[int] = field(default_factory=list)  # training: shorter side drawn from these sizes
    hflip: float = 0.5                      # training: horizontal flip probability
    anchor_size: int = 32                   # smallest anchor side (finest level; each level doubles it)
    roi_batch_size: int = 512               # Mask R-CNN training: RoIs sampled per image for the box and mask heads
    score_thresh: float = 0.05              # inference: drop detections below this score
    detections_per_img: int = 100           # inference: keep at most this many per image


# the ranges of the numeric settings (checked when the task is made and when a predictor changes them)
RANGES = dict(frozen_stages=NON_NEGATIVE, drop_path_rate=FRACTION, min_size=Range(32), max_size=Range(32),
              multi_scale=Range(32), hflip=FRACTION, anchor_size=Range(4), roi_batch_size=AT_LEAST_ONE,
              score_thresh=FRACTION, detections_per_img=AT_LEAST_ONE)


def check_config(config: DetectionConfig) -> None:
    """One HatNetError for the first setting out of range (before any data is read or a model built)."""
    check_arch(config.arch)
    check_head_norm(config.head_norm)
    check_ranges(config, RANGES)


class DetectionTask(Task):
    name = 'detection'
    primary_metric = 'bbox_AP'
    collate_fn = staticmethod(collate)

    def __init__(self, config: DetectionConfig):
        check_config(config)
        self.config = config
        self.category_ids: List[int] = []  # the dataset's category ids, in label order: build_datasets

    @property
    def iou_types(self) -> Tuple[str, ...]:
        return iou_types(self.config.arch)

    def build_datasets(self) -> Tuple[CocoDetection, CocoDetection]:
        c = self.config
        with_masks = 'segm' in self.iou_types
        train_set = CocoDetection(
            c.data, c.train_split, detection_transforms(True, c.multi_scale or [c.min_size], c.max_size, c.hflip),
            with_masks=with_masks, train=True)
        val_set = CocoDetection(c.data, c.val_split, detection_transforms(False), with_masks=with_masks)
        check_same_categories(train_set, val_set)
        for split, ds in (('train', train_set), ('val', val_set)):
            if ds.skipped and dist.is_main_process():
                _logger.warning('%s: skipped %s', split, ', '.join(f'{n} {what}' for what, n in ds.skipped.items()))
        self.class_names, self.category_ids = train_set.class_names, train_set.category_ids
        return train_set, val_set

    def build_model(self) -> nn.Module:
        return build_detector(self.config, len(self.class_names) + 1, pretrained=True)  # + the background

    def train_step(self, model: nn.Module, batch: Any, device: torch.device):
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> Dict[str, float]:
        dataset: CocoDetection = loader.dataset
        # each process predicts its shard; every process scores all of them, so all return the same numbers
        shards = dist.all_gather_object(predict_coco(model, loader, device, dataset.category_ids))
        return coco_metrics(dataset.coco.dataset, [r for shard in shards for r in shard], self.iou_types)

    def state(self) -> Dict[str, Any]:
        return dict(super().state(), category_ids=self.category_ids)

    @classmethod
    def load(cls, run_or_checkpoint, device: str = 'auto', score_thresh: Optional[float] = None,
             detections_per_img: Optional[int] = None, min_size: Optional[int] = None,
             max_size: Optional[int] = None, amp: str = 'none') -> 'DetectionPredictor':
        """A detector for inference from a run directory (its best checkpoint) or a checkpoint file of ``hatnet det
        train``. The options change the run's inference settings: drop detections scoring below
        ``score_thresh``, keep at most ``detections_per_img``, resize to a shorter side of ``min_size`` with the
        longer side at most ``max_size``; ``amp``: 'bf16' or 'fp16' to detect under autocast (see
        :class:`Predictor`)."""
        run = read_run(run_or_checkpoint, cls.name)
        state = run.task_state
        overrides = dict(score_thresh=score_thresh, detections_per_img=detections_per_img, min_size=min_size,
                         max_size=max_size)
        config = replace(DetectionConfig(**state['config']), **{k: v for k, v in overrides.items() if v is not None})
        check_config(config)
        model = build_detector(config, len(state['class_names']) + 1)
        load_weights(model, run.state_dict, source=str(run.path))
        return DetectionPredictor(model, state['class_names'], device, amp, category_ids=state['category_ids'],
                                  config=config)


def iou_types(arch: str) -> Tuple[str, ...]:
    """What COCO evaluates for a detector: boxes, and for Mask R-CNN also masks."""
    return ('bbox', 'segm') if arch == 'maskrcnn' else ('bbox',)


def build_detector(config: DetectionConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The detector a config describes, for ``num_classes`` classes counted as torchvision does (the background
    and the object classes); ``pretrained``: load ``config.pretrained`` into the backbone."""
    if config.arch == 'maskrcnn':
        inference = dict(box_score_thresh=config.score_thresh, box_detections_per_img=config.detections_per_img,
                         box_batch_size_per_image=config.roi_batch_size)
    else:
        inference = dict(score_thresh=config.score_thresh, detections_per_img=config.detections_per_img)
    return create_detector(
        config.arch, num_classes, backbone=config.model, pretrained_backbone=config.pretrained if pretrained else None,
        frozen_stages=config.frozen_stages, drop_path_rate=config.drop_path_rate, head_norm=config.head_norm,
        min_size=config.min_size, max_size=config.max_size, anchor_size=config.anchor_size, **inference)


def coco_results(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[dict]:
    """One image's detections (a torchvision detector's output) as COCO result entries (xywh boxes, category
    ids, RLE masks if present)."""
    masks = (output['masks'][:, 0] > MASK_THRESHOLD).cpu().numpy() if 'masks' in output else None
    labels = output['labels'].tolist()
    entries = _coco_entries(output['boxes'].detach().cpu().numpy(), [category_ids[i - 1] for i in labels],
                            output['scores'].tolist(), masks)
    return [dict(image_id=int(image_id), **entry) for entry in entries]


def _coco_entries(boxes: np.ndarray, category_ids: Sequence[int], scores: Sequence[float],
                  masks: Optional[np.ndarray]) -> List[dict]:
    """COCO result entries without the image id: category_id, bbox (x, y, width, height), score and, with
    (N, H, W) boolean masks, segmentation (compressed RLE)."""
    xywh = boxes.astype(np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    entries = [dict(category_id=int(c), bbox=box, score=float(score))
               for c, box, score in zip(category_ids, xywh.tolist(), scores)]
    if masks is not None and len(masks):
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for entry, rle in zip(entries, rles):
            entry['segmentation'] = dict(size=rle['size'], counts=rle['counts'].decode('ascii'))
    return entries


@torch.no_grad()
def predict_coco(model: nn.Module, loader: DataLoader, device: torch.device,
                 category_ids: Sequence[int]) -> List[dict]:
    """Run the detector over a loader of (image, target) batches; COCO result entries for all images."""
    model.eval()
    results = []
    for images, targets in loader:
        # one image per forward: a batch is padded to its largest image, and HAT-Net's norms and global
        # attention see the padding, so batched detections would depend on which images share a batch (the
        # trainer's evaluation, `det eval` and `det predict` then give one answer)
        outputs = [model([image.to(device, non_blocking=True)])[0] for image in images]
        for output, target in zip(outputs, targets):
            results += coco_results(output, target['image_id'], category_ids)
    return results


def coco_metrics(ground_truth: dict, results: List[dict], iou_types: Sequence[str] = ('bbox',)) -> Dict[str, float]:
    """COCO AP, AP50, AP75, APs/m/l for each IoU type ('bbox', 'segm'), as fractions.

    A value COCO cannot compute (no ground truth of that size) is NaN.
    """
    gt = EvalCOCO(ground_truth)
    metrics = {}
    for iou_type in iou_types:
        # segm: leave the boxes out, so that COCO sizes instances by their mask area (as detectron2 does).
        # loadRes changes the entries it is given (adds area, id, iscrowd, box polygons as segmentation): it gets
        # copies, so that results written or used later are the model's own
        entries = [{k: copy.deepcopy(v) for k, v in r.items() if iou_type == 'bbox' or k != 'bbox'} for r in results]
        evaluator = COCOeval_faster(gt, gt.loadRes(entries), iou_type, print_function=_logger.debug)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        for name, value in zip(COCO_STATS, evaluator.stats):
            metrics[f'{iou_type}_{name}'] = float(value) if value >= 0 else float('nan')
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# the auto recipe: the paper's COCO recipe fitted to the user's data and device

PHOTO_SIDE = 400            # a median shorter side from here on is photo-sized: COCO's is 480, which 800 upscales
PAPER_PIXELS = 2 * 800 * 1333  # what one paper process holds per step: 2 images at 1333x800
PAPER_BATCH = 16            # the global batch the recipes' lr and warm-up are written for
PAPER_WARMUP_STEPS = 500    # mmdetection's warm-up (warmup_epochs 0.068 of COCO's 7330 steps per epoch)
# images per step on a CPU (see fit_recipe): from scratch, more images per step learned far more in the same 600
# steps, for proportionally more time per step (docs/detection.md: RetinaNet bbox AP 0.50 at 8 against 0.28 at 4;
# Mask R-CNN segm AP 0.27 at 4 against 0.17 at 2)
CPU_BATCH = 8
# AdamW lr with a from-scratch backbone at 4 images per step (x sqrt(batch / 4) above), with the GroupNorm heads
# and clipped gradients of fit_recipe, measured on ``hatnet det shapes`` at batch 4 (docs/detection.md): RetinaNet
# bbox AP 0.28 at 3e-4, 0.20 at its recipe's 1e-4, 0.22 at 5e-4
SCRATCH_LR = 3e-4
SHORT_RUN = 600             # optimiser steps of a run on small data (see fit_recipe)
EVALUATIONS = 4             # per run on small data: enough to keep the best checkpoint, few enough to be cheap


@dataclass(frozen=True)
class DataStats:
    """What the auto recipe reads from a training split's annotation file."""
    images: int              # images with at least one usable (non-crowd, non-empty) box
    short_side: float        # median shorter image side, in pixels
    long_side: int           # longest image side of the split
    objects_per_image: float  # mean usable boxes per annotated image
    object_size: float       # median sqrt(box width x box height), in pixels


def data_stats(path) -> Optional[DataStats]:
    """The statistics of a COCO instances json, or None if it cannot be read as one (the data's own checks,
    when the datasets are built, then say what is wrong with it)."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        sizes = {img['id']: (int(img['width']), int(img['height'])) for img in data['images']}
        boxes = [(ann['image_id'], float(ann['bbox'][2]), float(ann['bbox'][3])) for ann in data['annotations']
                 if not ann.get('iscrowd') and ann['bbox'][2] > 0 and ann['bbox'][3] > 0 and ann['image_id'] in sizes]
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    annotated = {image_id for image_id, _, _ in boxes}
    if not annotated:
        return None
    return DataStats(
        images=len(annotated),
        short_side=float(np.median([min(sizes[i]) for i in annotated])),
        long_side=max(max(sizes[i]) for i in annotated),
        objects_per_image=len(boxes) / len(annotated),
        object_size=float(np.median([math.sqrt(w * h) for _, w, h in boxes])))


def fit_recipe(task_cfg: DetectionConfig, train_cfg: TrainConfig, given: frozenset,
               device: torch.device) -> List[Choice]:
    """The ``auto`` recipe's choices for the data: what the paper's COCO recipe (already in the configs) cannot
    know. Photo-sized images (median shorter side >= 400 px) keep the paper's settings; smaller images get
    their own scale, anchors, batch, lr, schedule and warm-up. Settings in ``given`` (the user's) are never
    chosen but are used for the others (e.g. lr and steps for a given batch size)."""
    stats = data_stats(split_paths(task_cfg.data, task_cfg.train_split)[1])
    if stats is None or stats.short_side >= PHOTO_SIDE:
        return []
    arch, choices = task_cfg.arch, []
    size = f'{stats.short_side:g} px'

    # scale: the images' own, not the 800 px that COCO's 480 px photos are upscaled to
    min_size = task_cfg.min_size if 'min_size' in given else round(stats.short_side)
    max_size = task_cfg.max_size if 'max_size' in given else max(stats.long_side, min_size)
    choices += [Choice('min_size', min_size, f'the median shorter image side is {size}: train at the images\' own '
                                             f'scale instead of upscaling them to 800 px'),
                Choice('max_size', max_size, 'the longest image side of the training images')]
    # anchors: the smallest anchor no larger than the typical object
    object_size = stats.object_size * min_size / stats.short_side
    if object_size < ANCHOR_SIZE:
        anchor = max(4, 2 ** math.floor(math.log2(object_size)))
        choices.append(Choice('anchor_size', anchor, f'the median object is {object_size:.0f} px at this scale, '
                                                     f'smaller than the default smallest anchor ({ANCHOR_SIZE} px)'))
    # batch and lr
    if 'batch_size' in given:
        batch = train_cfg.batch_size
    elif device.type == 'cpu':
        batch = CPU_BATCH
        choices.append(Choice('batch_size', batch, f'{batch} images per step on a CPU: from scratch, a short run '
                                                   f'learned far more from {batch} than from fewer per step'))
    else:
        pixels = min_size * max_size
        batch = int(min(PAPER_BATCH, max(2, PAPER_PIXELS // pixels)))
        choices.append(Choice('batch_size', batch, f'{min_size}x{max_size} images: {batch} fit in the pixels of '
                                                   f'the paper\'s 2 images at 1333x800'))
    global_batch = batch * train_cfg.accum_steps * launched_processes()
    if task_cfg.pretrained:
        lr = train_cfg.lr * global_batch / PAPER_BATCH
        why = f'the recipe\'s lr for batch {PAPER_BATCH}, scaled linearly to {global_batch}'
    else:
        lr = SCRATCH_LR * math.sqrt(max(1.0, global_batch / 4))
        why = (f'backbone from scratch at batch {global_batch}: the lr measured to learn on small data (the '
               f'recipe\'s is for an ImageNet-initialised backbone at batch {PAPER_BATCH})')
    if abs(lr - train_cfg.lr) > 1e-12:
        choices.append(Choice('lr', float(f'{lr:.3g}'), why))
    if not task_cfg.pretrained:
        # what lets a detector learn from scratch in a few hundred small-batch steps (measured in
        # docs/detection.md); the paper's detectors fine-tune an ImageNet backbone
        choices.append(Choice('head_norm', 'gn', 'backbone from scratch: GroupNorm in the FPN and the heads, as in '
                                                 'detectors trained from scratch'))
        if task_cfg.drop_path_rate:
            choices.append(Choice('drop_path_rate', 0.0, 'backbone from scratch on a short run: no stochastic depth'))
        if train_cfg.clip_grad is None:
            choices.append(Choice('clip_grad', 1.0, 'backbone from scratch: gradient norm clipped at 1'))
    if arch == 'maskrcnn' and task_cfg.roi_batch_size >= 128:
        # a quarter of the sampled RoIs are positives: 16 per object leaves 4 positives per object, while the
        # mask head's cost (most of a CPU step on small images) grows with every positive
        rois = int(min(task_cfg.roi_batch_size, max(32, 2 ** round(math.log2(16 * stats.objects_per_image)))))
        if rois != task_cfg.roi_batch_size:
            choices.append(Choice('roi_batch_size', rois, f'{stats.objects_per_image:.1f} objects per image: '
                                                          f'{rois} sampled RoIs per image are enough'))

    # schedule: the run's length in steps, its lr steps at the recipe's fractions, warm-up and evaluations
    steps_per_epoch = max(1, stats.images // (batch * train_cfg.accum_steps * launched_processes()))
    length_given = bool({'epochs', 'iters'} & given)
    if length_given:
        total = train_cfg.iters or train_cfg.epochs * steps_per_epoch
    else:
        paper_length = train_cfg.epochs * steps_per_epoch if train_cfg.epochs else train_cfg.iters
        total = SHORT_RUN if device.type == 'cpu' else max(SHORT_RUN, paper_length)
        length = train_cfg.epochs or train_cfg.iters
        fractions = [m / length for m in train_cfg.decay_milestones]
        choices += [Choice('iters', total, f'{stats.images} training images: {total} steps (the recipe\'s 12 epochs '
                                           f'are {paper_length}); give --iters or --epochs for another length'),
                    Choice('epochs', 0, 'the length is given in steps'),
                    Choice('decay_milestones', [max(1, round(f * total)) for f in fractions],
                           'the recipe\'s lr steps at the same fractions of the run'),
                    Choice('eval_every', max(1, total // EVALUATIONS), f'{EVALUATIONS} evaluations in the run')]
    warmup = min(PAPER_WARMUP_STEPS, max(1, total // 10))
    choices += [Choice('warmup_iters', warmup, f'the paper\'s {PAPER_WARMUP_STEPS} warm-up steps, at most a tenth '
                                               f'of the {total}-step run'),
                Choice('warmup_epochs', 0.0, 'warm-up given in steps (the recipe\'s 0.068 epochs are COCO\'s 500)')]
    return [c for c in choices if c.key not in given]


# ---------------------------------------------------------------------------------------------------------------
# inference


@dataclass
class Detection(Prediction):
    """The objects found in one image, most confident first."""
    boxes: np.ndarray                 # (N, 4) float32 x1, y1, x2, y2 in the image's pixels
    labels: List[str]                 # class names
    category_ids: List[int]           # the dataset's category ids
    scores: np.ndarray                # (N,) float32
    masks: Optional[np.ndarray] = None  # (N, H, W) bool at the image's size (Mask R-CNN); None for boxes only

    def draw(self) -> Image.Image:
        """The input image with the masks, boxes and, on filled labels sized to the image, class names and
        scores drawn on it (the most confident last, on top)."""
        picture = self.input_picture()
        if not len(self.labels):
            return picture.copy()
        colours = [_category_colour(c) for c in self.category_ids]
        image = pil_to_tensor(picture)
        if self.masks is not None:
            image = draw_segmentation_masks(image, torch.from_numpy(self.masks), alpha=0.45, colors=colours)
        width = max(2, round(min(picture.size) / 200))  # lines and labels scale with the image
        image = draw_bounding_boxes(image, torch.from_numpy(self.boxes), colors=colours, width=width)
        drawn = Image.fromarray(image.permute(1, 2, 0).numpy())
        draw, font = ImageDraw.Draw(drawn), font_for(drawn.size)
        for box, label, score, colour in reversed(list(zip(self.boxes.tolist(), self.labels, self.scores.tolist(),
                                                            colours))):
            height = draw.textbbox((0, 0), label, font=font)[3]
            draw_label(draw, (box[0], box[1] - height - width), f'{label} {score:.2f}', colour, font, drawn.size)
        return drawn

    @cached_property
    def _entries(self) -> List[dict]:
        # encoded once: the masks' RLE is the costly part, and predict writes both forms
        return _coco_entries(self.boxes, self.category_ids, self.scores.tolist(), self.masks)

    def to_dict(self) -> Dict[str, Any]:
        """The image and its detections as COCO result entries (category_id, bbox as x, y, width, height, score,
        segmentation as RLE for masks) with the class name as ``label``."""
        detections = [dict(entry, label=label) for entry, label in zip(self._entries, self.labels)]
        return dict(image=self.image, detections=detections)

    def coco_results(self, image_id: int) -> List[dict]:
        """The detections as entries of a COCO results json (image_id, category_id, bbox x, y, width, height,
        score, and segmentation as compressed RLE for masks), for ``pycocotools`` ``loadRes``."""
        return [dict(image_id=int(image_id), **entry) for entry in self._entries]


def _category_colour(category_id: int) -> Tuple[int, int, int]:
    import matplotlib
    return tuple(int(255 * v) for v in matplotlib.colormaps['tab20'](category_id % 20)[:3])


class DetectionPredictor(Predictor):
    """A detector with the run's categories and inference settings (see :meth:`DetectionTask.load`)."""
    task = DetectionTask.name

    def __init__(self, model: nn.Module, class_names: List[str], device='auto', amp: str = 'none', *,
                 category_ids: List[int], config: DetectionConfig):
        super().__init__(model, class_names, device, amp)
        self.category_ids = list(category_ids)  # the dataset's id of each class
        self.config = config                    # the run's settings with the inference overrides

    def check_input(self, source: Optional[str], picture: Image.Image) -> None:
        """The detector pads its input to a multiple of 32: an image only needs a side left after the resize."""
        check_resized_size([(source, picture)], self.config.min_size, self.config.max_size, 1)

    @torch.no_grad()
    def predict(self, images: Images) -> List[Detection]:
        """The objects in each image (the model resizes it, and maps its boxes and masks back to the image).
        One image at a time: in a batch, torchvision pads the images to a common size, which changes the
        features near the borders and so the detections."""
        inputs = read_inputs(images)
        for source, picture in inputs:
            self.check_input(source, picture)
        results = []
        for source, picture in inputs:
            with self.autocast():
                output = self.model([pil_to_tensor(picture).to(self.device) / 255.])[0]
            results.append(self._detection(source, picture, {k: v.cpu() for k, v in output.items()}))
        return results

    def _detection(self, source: Optional[str], picture: Image.Image, output: Dict[str, torch.Tensor]) -> Detection:
        order = output['scores'].argsort(descending=True, stable=True)
        labels = output['labels'][order].tolist()
        masks = output['masks'][order, 0] > MASK_THRESHOLD if 'masks' in output else None
        return Detection(source, output['boxes'][order].numpy(), [self.class_names[i - 1] for i in labels],
                         [self.category_ids[i - 1] for i in labels], output['scores'][order].numpy(),
                         None if masks is None else masks.numpy(), picture=picture)

    def evaluate(self, data, split: Optional[str] = None, batch_size: int = 2, workers: int = 2,
                 results_file=None) -> Dict[str, float]:
        """COCO AP, AP50, AP75, APs/m/l of the boxes (``bbox_*``) and, for Mask R-CNN, of the masks (``segm_*``)
        on one split of a COCO-format dataset (default: the run's validation split); NaN where COCO cannot
        compute one. ``results_file``: also write the detections there as a COCO results json."""
        dataset = CocoDetection(data, split or self.config.val_split, detection_transforms(False),
                                with_masks=self.config.arch == 'maskrcnn')
        if dataset.category_ids != self.category_ids or dataset.class_names != self.class_names:
            raise DatasetError(f'{dataset.annotation_file} lists other categories than the detector was trained on '
                               f'({", ".join(self.class_names)})')
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        with self.autocast(), worker_errors_unwrapped():
            detections = predict_coco(self.model, loader, self.device, dataset.category_ids)
        if results_file is not None:
            write_json(detections, results_file)
        return coco_metrics(dataset.coco.dataset, detections, iou_types(self.config.arch))


# ---------------------------------------------------------------------------------------------------------------
# what the det commands run


def image_ids_for(images: Sequence, annotations=None) -> List[int]:
    """The COCO image id of each image file: from a COCO json's image list, matched by file name (the
    ``file_name`` itself or its last part, as COCO's own files list bare names), or 1, 2, ... without one."""
    if annotations is None:
        return list(range(1, len(images) + 1))
    try:
        with open(annotations, encoding='utf-8') as f:
            listed = json.load(f)['images']
        by_name: Dict[str, List[int]] = {}
        for image in listed:
            by_name.setdefault(str(image['file_name']).replace('\\', '/').rsplit('/', 1)[-1], []).append(
                int(image['id']))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f'cannot read {annotations}: {e}') from None
    except (ValueError, TypeError, KeyError):
        raise DatasetError(f'{annotations} is not a COCO json with an image list of ids and file names') from None
    ids = []
    for image in images:
        image = image if hasattr(image, 'name') else Path(image)  # a path, or a video frame
        found = by_name.get(image.name, [])
        if len(found) != 1:
            raise DatasetError(f'{annotations} lists {"no" if not found else len(found)} image(s) named '
                               f'{image.name!r}; give images it lists once')
        ids.append(found[0])
    return ids


def write_json(obj: Any, path) -> None:
    """JSON file written atomically (temp file + rename)."""
    write_text_atomic(path, json.dumps(obj))


def write_csv(metrics: Dict[str, float], path) -> None:
    """The metrics as a two-line CSV (names, values), written atomically."""
    write_csv_atomic(path, list(metrics), [[f'{v:.6g}' for v in metrics.values()]])
