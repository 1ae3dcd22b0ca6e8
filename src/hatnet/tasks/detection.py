"""Object detection (RetinaNet) and instance segmentation (Mask R-CNN) as a :class:`hatnet.engine.Task`.

Also the pieces ``hatnet det eval`` / ``det predict`` share with training: turning the detector's outputs into
COCO results, COCO evaluation (faster-coco-eval, the pycocotools algorithm), and drawing detections.
"""
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from faster_coco_eval import COCO as EvalCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.detection import CocoDetection, check_same_categories, collate, detection_transforms
from ..engine.task import Task
from ..errors import HatNetError
from ..models.detection import ARCHS, create_detector

__all__ = ['COCO_STATS', 'DetectionConfig', 'DetectionTask', 'coco_metrics', 'coco_results', 'draw_detections',
           'predict_coco']

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
    score_thresh: float = 0.05              # inference: drop detections below this score
    detections_per_img: int = 100           # inference: keep at most this many per image


class DetectionTask(Task):
    name = 'detection'
    primary_metric = 'bbox_AP'
    collate_fn = staticmethod(collate)

    def __init__(self, config: DetectionConfig):
        if config.arch not in ARCHS:
            raise HatNetError(f'unknown detector {config.arch!r}: choose one of {", ".join(ARCHS)}')
        self.config = config
        self.train_set: Optional[CocoDetection] = None
        self.val_set: Optional[CocoDetection] = None

    @property
    def with_masks(self) -> bool:
        return self.config.arch == 'maskrcnn'

    def build_datasets(self) -> Tuple[CocoDetection, CocoDetection]:
        c = self.config
        train_sizes = c.multi_scale or [c.min_size]
        self.train_set = CocoDetection(
            c.data, c.train_split, detection_transforms(True, train_sizes, c.max_size, c.hflip),
            with_masks=self.with_masks, train=True)
        self.val_set = CocoDetection(c.data, c.val_split, detection_transforms(False), with_masks=self.with_masks)
        check_same_categories(self.train_set, self.val_set)
        for split, ds in (('train', self.train_set), ('val', self.val_set)):
            if ds.skipped:
                _logger.warning('%s: skipped %s', split, ', '.join(f'{n} {what}' for what, n in ds.skipped.items()))
        return self.train_set, self.val_set

    def build_model(self) -> nn.Module:
        if self.train_set is None:
            self.build_datasets()
        c = self.config
        return create_detector(
            c.arch, self.train_set.num_classes, backbone=c.model, pretrained_backbone=c.pretrained,
            frozen_stages=c.frozen_stages, drop_path_rate=c.drop_path_rate, min_size=c.min_size,
            max_size=c.max_size, score_thresh=c.score_thresh, detections_per_img=c.detections_per_img)

    def train_step(self, model: nn.Module, batch: Any, device: torch.device):
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), {k: v.item() for k, v in losses.items()}

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> Dict[str, float]:
        dataset: CocoDetection = loader.dataset
        results = predict_coco(model, loader, device, dataset.category_ids)
        return coco_metrics(dataset.coco.dataset, results, self.iou_types)

    @property
    def iou_types(self) -> Tuple[str, ...]:
        return ('bbox', 'segm') if self.with_masks else ('bbox',)

    def state(self) -> Dict[str, Any]:
        ds = self.train_set
        return dict(config=asdict(self.config), num_classes=ds.num_classes, class_names=ds.class_names,
                    category_ids=ds.category_ids)


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
