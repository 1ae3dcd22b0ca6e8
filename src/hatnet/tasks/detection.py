"""Object detection (RetinaNet) and instance segmentation (Mask R-CNN) as a :class:`hatnet.engine.Task`.

Also the pieces ``hatnet det eval`` / ``det predict`` share with training: turning the detector's outputs into
COCO results, COCO evaluation (faster-coco-eval, the pycocotools algorithm), and drawing detections.
"""
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from faster_coco_eval import COCO as EvalCOCO
from faster_coco_eval import COCOeval_faster
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..fileio import atomic_write, write_csv_atomic, write_text_atomic
from ..data.detection import CocoDetection, check_same_categories, collate, detection_transforms
from ..engine import Task, TrainConfig, load_run_checkpoint, load_weights
from ..engine import distributed as dist
from ..engine import resolve_config
from ..errors import CheckpointError, DatasetError, InputError
from ..models.detection import check_arch, create_detector

__all__ = ['COCO_STATS', 'DetectionConfig', 'DetectionTask', 'TrainedDetector', 'build_detector', 'coco_metrics',
           'coco_results', 'detection_configs', 'draw_detections', 'evaluate_checkpoint', 'iou_types', 'load_detector',
           'predict_coco', 'predict_images', 'write_csv', 'write_json']

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
    min_size: int = 800                     # shorter image side (inference; training unless multi_scale)
    max_size: int = 1333                    # cap on the longer side
    multi_scale: List[int] = field(default_factory=list)  # training: shorter side drawn from these sizes
    hflip: float = 0.5                      # training: horizontal flip probability
    roi_batch_size: int = 512               # Mask R-CNN training: RoIs sampled per image for the box and mask heads
    score_thresh: float = 0.05              # inference: drop detections below this score
    detections_per_img: int = 100           # inference: keep at most this many per image


class DetectionTask(Task):
    name = 'detection'
    primary_metric = 'bbox_AP'
    collate_fn = staticmethod(collate)

    def __init__(self, config: DetectionConfig):
        check_arch(config.arch)
        self.config = config
        self._datasets: Optional[Tuple[CocoDetection, CocoDetection]] = None

    @property
    def iou_types(self) -> Tuple[str, ...]:
        return iou_types(self.config.arch)

    def build_datasets(self) -> Tuple[CocoDetection, CocoDetection]:
        if self._datasets is None:  # the model needs the number of classes: built once, for both
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
            self._datasets = train_set, val_set
        return self._datasets

    def build_model(self) -> nn.Module:
        return build_detector(self.config, self.build_datasets()[0].num_classes, pretrained=True)

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
        train_set = self.build_datasets()[0]
        return dict(config=asdict(self.config), num_classes=train_set.num_classes,
                    class_names=train_set.class_names, category_ids=train_set.category_ids)


def iou_types(arch: str) -> Tuple[str, ...]:
    """What COCO evaluates for a detector: boxes, and for Mask R-CNN also masks."""
    return ('bbox', 'segm') if arch == 'maskrcnn' else ('bbox',)


def build_detector(config: DetectionConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The detector a config describes (``pretrained``: load ``config.pretrained`` into the backbone)."""
    if config.arch == 'maskrcnn':
        inference = dict(box_score_thresh=config.score_thresh, box_detections_per_img=config.detections_per_img,
                         box_batch_size_per_image=config.roi_batch_size)
    else:
        inference = dict(score_thresh=config.score_thresh, detections_per_img=config.detections_per_img)
    return create_detector(
        config.arch, num_classes, backbone=config.model, pretrained_backbone=config.pretrained if pretrained else None,
        frozen_stages=config.frozen_stages, drop_path_rate=config.drop_path_rate, min_size=config.min_size,
        max_size=config.max_size, **inference)


@dataclass
class TrainedDetector:
    """A detector rebuilt from a run checkpoint, with the facts needed to use it."""
    model: nn.Module
    config: DetectionConfig
    class_names: List[str]
    category_ids: List[int]
    metrics: Dict[str, Any]


def load_detector(checkpoint, **overrides) -> TrainedDetector:
    """Rebuild a trained detector from a run directory (its best checkpoint) or a checkpoint file.

    ``overrides``: inference settings to change (score_thresh, detections_per_img, min_size, max_size).
    """
    ckpt = load_run_checkpoint(checkpoint, task=DetectionTask.name)
    if ckpt.task != DetectionTask.name:
        raise CheckpointError(f'{ckpt.path} is not a hatnet detection checkpoint (train one with hatnet det train)')
    state = ckpt.task_state
    config = replace(DetectionConfig(**state['config']), **{k: v for k, v in overrides.items() if v is not None})
    model = build_detector(config, state['num_classes'])
    load_weights(model, ckpt.state_dict, source=str(ckpt.path))
    return TrainedDetector(model.eval(), config, state['class_names'], state['category_ids'], ckpt.metrics)


def coco_results(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[dict]:
    """One image's detections as COCO result entries (xywh boxes, category ids, RLE masks if present)."""
    boxes = output['boxes'].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    entries = [dict(image_id=int(image_id), category_id=int(category_ids[label - 1]), bbox=box, score=score)
               for box, label, score in zip(boxes.tolist(), output['labels'].tolist(), output['scores'].tolist())]
    if 'masks' in output:
        masks = (output['masks'][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
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
        outputs = model([image.to(device, non_blocking=True) for image in images])
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
        # segm: leave the boxes out, so that COCO sizes instances by their mask area (as detectron2 does)
        entries = results if iou_type == 'bbox' else [{k: v for k, v in r.items() if k != 'bbox'} for r in results]
        evaluator = COCOeval_faster(gt, gt.loadRes(entries), iou_type, print_function=_logger.debug)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        for name, value in zip(COCO_STATS, evaluator.stats):
            metrics[f'{iou_type}_{name}'] = float(value) if value >= 0 else float('nan')
    return metrics


def _class_colours(num_classes: int) -> List[Tuple[int, int, int]]:
    import matplotlib
    cmap = matplotlib.colormaps['tab20']
    return [tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(num_classes)]


def draw_detections(image: torch.Tensor, output: Dict[str, torch.Tensor], class_names: Sequence[str]) -> torch.Tensor:
    """uint8 (3, H, W) image with the detections' masks, boxes, class names and scores drawn on it."""
    colours = _class_colours(len(class_names) + 1)
    labels = output['labels'].tolist()
    box_colours = [colours[label] for label in labels]
    if 'masks' in output and len(labels):
        image = draw_segmentation_masks(image, output['masks'][:, 0] > MASK_THRESHOLD, alpha=0.45, colors=box_colours)
    captions = [f'{class_names[label - 1]} {score:.2f}' for label, score in zip(labels, output['scores'].tolist())]
    return draw_bounding_boxes(image, output['boxes'], captions, colors=box_colours, width=2)


# ---------------------------------------------------------------------------------------------------------------
# what the det commands run


def detection_configs(options: Dict[str, Any], recipe: Optional[str] = None) -> Tuple[TrainConfig, DetectionConfig]:
    """Settings of a ``det train`` run: defaults < recipe (by default the arch's 1x COCO recipe) < options;
    ``resume`` reads the run's own config.yaml. A new length moves the recipe's lr steps (``resolve_config``)."""
    recipe = recipe or (None if options.get('resume') else f'coco_{options.get("arch") or "retinanet"}_1x')
    return resolve_config(DetectionConfig, options, recipe=recipe)


def _check_categories(dataset: CocoDetection, detector: TrainedDetector) -> None:
    if dataset.category_ids != detector.category_ids or dataset.class_names != detector.class_names:
        raise DatasetError(f'{dataset.annotation_file} lists other categories than the detector was trained on '
                           f'({", ".join(detector.class_names)})')


def evaluate_checkpoint(checkpoint, data, split: Optional[str] = None, batch_size: int = 2, workers: int = 2,
                        device: str = 'auto', **overrides) -> Tuple[Dict[str, float], List[dict]]:
    """COCO metrics of a trained detector on one split (default: the run's validation split), and its
    detections as COCO results."""
    device = dist.resolve_device(device)
    detector = load_detector(checkpoint, **overrides)
    dataset = CocoDetection(data, split or detector.config.val_split, detection_transforms(False),
                            with_masks=detector.config.arch == 'maskrcnn')
    _check_categories(dataset, detector)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    detections = predict_coco(detector.model.to(device), loader, device, dataset.category_ids)
    return coco_metrics(dataset.coco.dataset, detections, iou_types(detector.config.arch)), detections


def _read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert('RGB'))
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f'cannot read image {path}: {e}') from None


@torch.no_grad()
def predict_images(images: Sequence[Path], checkpoint, out: Path, device: str = 'auto', **overrides) -> List[Path]:
    """Detect objects in image files; writes ``out/<name>.png`` (detections drawn) and ``out/predictions.json``.

    Every image is checked before anything is written. ``overrides``: score_thresh, detections_per_img, ...
    """
    images, out = [Path(p) for p in images], Path(out)
    pngs = [out / f'{p.stem}.png' for p in images]
    for path, png in zip(images, pngs):
        _read_image(path)
        if pngs.count(png) > 1:
            raise InputError(f'two input images would both be drawn to {png}; rename one of them')
    device = dist.resolve_device(device)
    detector = load_detector(checkpoint, **overrides)
    model = detector.model.to(device)
    entries = []
    for path, png in zip(images, pngs):
        image = _read_image(path)
        output = {k: v.cpu() for k, v in model([image.to(device) / 255.])[0].items()}
        drawn = draw_detections(image, output, detector.class_names).permute(1, 2, 0).numpy()
        atomic_write(png, lambda tmp: Image.fromarray(drawn).save(tmp, format='PNG'))
        detections = coco_results(output, 0, detector.category_ids)
        for entry, label in zip(detections, output['labels'].tolist()):
            del entry['image_id']
            entry['label'] = detector.class_names[label - 1]
        entries.append(dict(image=str(path), drawing=str(png), detections=detections))
    write_json(entries, out / 'predictions.json')
    return pngs


def write_json(obj: Any, path) -> None:
    """JSON file written atomically (temp file + rename)."""
    write_text_atomic(path, json.dumps(obj))


def write_csv(metrics: Dict[str, float], path) -> None:
    """The metrics as a two-line CSV (names, values), written atomically."""
    write_csv_atomic(path, list(metrics), [[f'{v:.6g}' for v in metrics.values()]])
