"""Semantic segmentation: Semantic FPN on a HAT-Net (or any timm) backbone, trained by the one trainer.

Evaluation follows mmsegmentation (as PVT and HAT-Net report ADE20K): images resized to a short side of
512, logits resized back to the annotation's full size, metrics from one exact confusion matrix over the
whole split (ignored pixels left out):

* IoU per class = TP / (TP + FP + FN); mIoU is their mean over the classes that occur in the annotations or
  the predictions;
* Acc per class = TP / (TP + FN); mAcc is their mean over the classes that occur in the annotations;
* aAcc = correctly labelled pixels / labelled pixels.

Sliding-window inference (windows of the crop size, overlapping by a third) and horizontal-flip
averaging are optional.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

from ..data.segmentation import (
    SegmentationData, SegmentationDataset, collate, eval_transform, load_data, train_transform)
from ..engine import Task
from ..models.semantic_fpn import SemanticFPN


@dataclass
class SegmentationConfig:
    """The segmentation task's own recipe keys (the trainer's are :class:`hatnet.engine.TrainConfig`)."""
    data: str = ''
    layout: str = 'ade20k'              # ade20k | folders (see hatnet.data.segmentation)
    model: str = 'hat_net_tiny'         # backbone: a hat_net variant or any timm features_only model
    pretrained: Optional[str] = None    # ImageNet checkpoint of the backbone (.pth / .safetensors)
    num_classes: int = 0                # 0: read from the data
    crop_size: int = 512                # training crops
    short_side: int = 512               # test scale; training scales are short_side x U(ratio_range)
    ratio_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75         # crop rule: no single class covers more of a crop (1 = off)
    norm: str = 'gn'                    # scale-head norm: gn | bn
    drop_path_rate: float = 0.1
    slide: bool = False                 # sliding-window evaluation (windows of crop_size, stride 2/3 of it)
    flip: bool = False                  # average with the horizontally flipped image at evaluation


def normalization(model_name: str) -> Tuple[Sequence[float], Sequence[float]]:
    """The input mean / std the backbone was pretrained with (ImageNet's by default)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    return (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@torch.no_grad()
def predict_probs(model: nn.Module, image: torch.Tensor, out_size: Tuple[int, int], window: int = 0,
                  flip: bool = False) -> torch.Tensor:
    """Class probabilities (1, C, *out_size) for one normalised image (1, 3, h, w).

    ``window`` > 0 runs the model on overlapping window x window crops (stride 2/3 of the window) and
    averages the logits where they overlap; ``flip`` averages with the horizontally flipped image.
    """
    def logits(x: torch.Tensor) -> torch.Tensor:
        out = sliding_window(model, x, window) if window else model(x)
        return F.interpolate(out.float(), size=out_size, mode='bilinear', align_corners=False)

    probs = logits(image).softmax(1)
    if flip:
        probs = (probs + logits(image.flip(-1)).softmax(1).flip(-1)) / 2
    return probs


def _window_starts(size: int, window: int, stride: int) -> List[int]:
    last = max(size - window, 0)  # the last window is shifted back to end at the border
    return [min(start, last) for start in range(0, last + stride, stride)]


def sliding_window(model: nn.Module, image: torch.Tensor, window: int) -> torch.Tensor:
    """Logits of ``image`` from overlapping windows (mmsegmentation's 'slide' mode, stride = 2/3 window)."""
    stride = max(1, window * 2 // 3)
    height, width = image.shape[-2:]
    logits = counts = None
    for top in _window_starts(height, window, stride):
        for left in _window_starts(width, window, stride):
            out = model(image[..., top:top + window, left:left + window])
            if logits is None:
                logits = out.new_zeros(*out.shape[:2], height, width)
                counts = out.new_zeros(1, 1, height, width)
            logits[..., top:top + window, left:left + window] += out
            counts[..., top:top + window, left:left + window] += 1
    return logits / counts


def confusion_matrix(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                     ignore_index: int, window: int = 0, flip: bool = False, progress=None) -> torch.Tensor:
    """The (num_classes x num_classes) confusion matrix, rows = annotation, columns = prediction, summed
    over the loader (and over all processes of a distributed run)."""
    metric = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)
    was_training = model.training
    model.eval()
    for images, masks in loader:
        for image, mask in zip(images, masks):
            mask = mask.to(device)
            probs = predict_probs(model, image[None].to(device), mask.shape[-2:], window, flip)
            metric.update(probs.argmax(1)[0], mask)
            if progress is not None:
                progress()
    model.train(was_training)
    return metric.compute()  # sums the matrices of all processes when torch.distributed is initialised


def segmentation_metrics(confusion: torch.Tensor) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc (fractions) and per-class IoU / Acc (NaN for classes that never occur)."""
    confusion = confusion.double()
    true_positives = confusion.diag()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    iou = true_positives / (labelled + predicted - true_positives)
    acc = true_positives / labelled
    return dict(mIoU=iou.nanmean().item(), mAcc=acc.nanmean().item(),
                aAcc=(true_positives.sum() / confusion.sum()).item(), IoU=iou.tolist(), Acc=acc.tolist())


class SegmentationTask(Task):
    name = 'segmentation'
    primary_metric = 'mIoU'
    collate_fn = staticmethod(collate)

    def __init__(self, cfg: SegmentationConfig, data: Optional[SegmentationData] = None):
        self.cfg = cfg
        self.data = data

    def _load_data(self) -> SegmentationData:
        if self.data is None:
            self.data = load_data(self.cfg.data, self.cfg.layout, num_classes=self.cfg.num_classes or None)
        return self.data

    def build_model(self) -> nn.Module:
        data = self._load_data()
        return SemanticFPN(self.cfg.model, data.num_classes, pretrained=self.cfg.pretrained, norm=self.cfg.norm,
                           drop_path_rate=self.cfg.drop_path_rate)

    def build_datasets(self):
        cfg, data = self.cfg, self._load_data()
        mean, std = normalization(cfg.model)
        train_split, val_split = list(data.samples)
        train = SegmentationDataset(
            data.samples[train_split],
            train_transform(cfg.crop_size, cfg.short_side, mean, std, tuple(cfg.ratio_range), cfg.cat_max_ratio,
                            data.ignore_index),
            data.ignore_index, data.reduce_zero_label)
        val = SegmentationDataset(data.samples[val_split], eval_transform(cfg.short_side, mean, std),
                                  data.ignore_index, data.reduce_zero_label, joint=False)
        return train, val

    def train_step(self, model, batch, device):
        images, masks = batch
        logits = model(torch.stack(images).to(device, non_blocking=True))
        loss = F.cross_entropy(logits.float(), torch.stack(masks).to(device, non_blocking=True),
                               ignore_index=self.data.ignore_index)
        return loss, {}

    def evaluate(self, model, loader, device):
        confusion = confusion_matrix(model, loader, device, self.data.num_classes, self.data.ignore_index,
                                     self.cfg.crop_size if self.cfg.slide else 0, self.cfg.flip)
        metrics = segmentation_metrics(confusion)
        return {key: metrics[key] for key in ('mIoU', 'mAcc', 'aAcc')}

    def state(self) -> Dict[str, Any]:
        data = self._load_data()
        return dict(config=asdict(self.cfg), class_names=data.class_names, ignore_index=data.ignore_index,
                    palette=[list(c) for c in data.palette])
