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
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix

from ..fileio import atomic_write
from ..data.segmentation import (
    SegmentationData, SegmentationDataset, collate, colorize, eval_transform, get_layout, image_size, load_data,
    load_image, train_transform)
from ..engine import Task, distributed, load_run_checkpoint, load_weights
from ..engine.checkpoint import BEST
from ..errors import CheckpointError, InputError
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
    drop_path_rate: Optional[float] = 0.1  # backbone stochastic depth (null: the backbone's default)
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
    """The exact (num_classes x num_classes) confusion matrix, rows = annotation, columns = prediction, summed
    over the loader and over all processes of a distributed run (ignored pixels left out)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks in loader:
        for image, mask in zip(images, masks):
            mask = mask.to(device)
            prediction = predict_probs(model, image[None].to(device), mask.shape[-2:], window, flip).argmax(1)[0]
            confusion += multiclass_confusion_matrix(prediction, mask, num_classes, ignore_index=ignore_index,
                                                     validate_args=False)
            if progress is not None:
                progress()
    return distributed.all_reduce_sum(confusion).round().long()


def segmentation_metrics(confusion: torch.Tensor) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc (fractions) and per-class IoU / Acc lists (NaN for a class that occurs nowhere)."""
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

    def __init__(self, config: SegmentationConfig):
        self.config = config
        self._data: Optional[SegmentationData] = None

    @property
    def data(self) -> SegmentationData:
        """The checked dataset (read on first use; every check runs before anything is trained or written)."""
        if self._data is None:
            self._data = load_data(self.config.data, self.config.layout, num_classes=self.config.num_classes or None)
        return self._data

    def pretrained_file(self) -> Optional[Path]:
        """The backbone's ImageNet checkpoint file (a run directory means its best checkpoint)."""
        if not self.config.pretrained:
            return None
        path = Path(self.config.pretrained)
        path = path / BEST if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f'pretrained checkpoint not found: {path}')
        return path

    def check_inputs(self) -> Tuple[SegmentationData, Optional[Path]]:
        """The checked dataset and pretrained file: every check of user input that can run before the trainer
        creates the run directory."""
        return self.data, self.pretrained_file()

    def build_model(self) -> nn.Module:
        cfg = self.config
        model = SemanticFPN(cfg.model, self.data.num_classes, pretrained=self.pretrained_file(), norm=cfg.norm,
                            drop_path_rate=cfg.drop_path_rate)
        if cfg.norm == 'bn' and distributed.is_distributed() and torch.distributed.get_backend() == 'nccl':
            # batch statistics over the global batch, as mmsegmentation's SyncBN (CUDA only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def build_datasets(self):
        cfg, data = self.config, self.data
        mean, std = normalization(cfg.model)
        train_split, val_split = get_layout(cfg.layout).splits
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
        cfg = self.config
        confusion = confusion_matrix(model, loader, device, self.data.num_classes, self.data.ignore_index,
                                     cfg.crop_size if cfg.slide else 0, cfg.flip)
        metrics = segmentation_metrics(confusion)
        return {key: metrics[key] for key in ('mIoU', 'mAcc', 'aAcc')}

    def state(self) -> Dict[str, Any]:
        return dict(config=asdict(self.config), class_names=self.data.class_names,
                    ignore_index=self.data.ignore_index, palette=[list(c) for c in self.data.palette])


@dataclass
class TrainedModel:
    """A trained model (eval mode, on its device) with the run's facts and the test-time settings."""
    model: SemanticFPN
    state: Dict[str, Any]   # the run's task state: config, class_names, ignore_index, palette
    device: torch.device
    short_side: int         # test scale
    window: int             # sliding-window side, 0 for whole-image inference

    @classmethod
    def load(cls, checkpoint, device: str = 'auto', short_side: Optional[int] = None, slide: bool = False,
             window: Optional[int] = None) -> 'TrainedModel':
        """From a run directory (its best checkpoint) or a checkpoint file written by ``hatnet seg train``; the
        test scale defaults to the run's, the sliding window to its crop size."""
        run = load_run_checkpoint(checkpoint, task=SegmentationTask.name)
        if run.task != SegmentationTask.name:
            raise CheckpointError(f'{run.path} holds bare weights, not a segmentation run; give a run directory of '
                                  f'`hatnet seg train` or one of its checkpoints')
        state = run.task_state
        cfg = state['config']
        model = SemanticFPN(cfg['model'], len(state['class_names']), norm=cfg['norm'])
        load_weights(model, run.state_dict, source=str(run.path))
        device = distributed.resolve_device(device)
        return cls(model.to(device).eval(), state, device, short_side or cfg['short_side'],
                   (window or cfg['crop_size']) if slide else 0)

    @property
    def transform(self):
        return eval_transform(self.short_side, *normalization(self.state['config']['model']))


def evaluate_checkpoint(
        checkpoint,
        data_dir,
        layout: Optional[str] = None,
        split: Optional[str] = None,
        flip: bool = False,
        workers: int = 2,
        progress: bool = True,
        **load_options,
) -> Dict[str, Any]:
    """Evaluate a trained model on one split of a dataset (layout and classes: the run's by default).
    ``load_options`` go to :meth:`TrainedModel.load`. Returns mIoU / mAcc / aAcc and per-class IoU / Acc."""
    from tqdm import tqdm
    trained = TrainedModel.load(checkpoint, **load_options)
    layout = layout or trained.state['config']['layout']
    split = split or get_layout(layout).splits[1]
    data = load_data(data_dir, layout, splits=[split], num_classes=len(trained.state['class_names']))
    dataset = SegmentationDataset(data.samples[split], trained.transform, data.ignore_index, data.reduce_zero_label,
                                  joint=False)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate)
    with tqdm(total=len(dataset), desc=f'evaluating {split}', unit='img', disable=not progress) as bar:
        confusion = confusion_matrix(trained.model, loader, trained.device, data.num_classes, data.ignore_index,
                                     trained.window, flip, progress=lambda: bar.update(1))
    return dict(segmentation_metrics(confusion), class_names=trained.state['class_names'], split=split,
                images=len(dataset), short_side=trained.short_side, window=trained.window, flip=flip)


def predict_images(
        checkpoint,
        images: Sequence,
        out_dir,
        flip: bool = False,
        alpha: float = 0.5,
        **load_options,
) -> List[Dict[str, Any]]:
    """Segment image files; for each write ``<stem>_mask.png`` (class indices as a colour-palette PNG) and
    ``<stem>_overlay.png`` (the colours blended over the image), both at the image's size.
    ``load_options`` go to :meth:`TrainedModel.load`."""
    from PIL import Image
    images = [Path(p) for p in images]
    stems = [p.stem for p in images]
    duplicate = next((s for s in stems if stems.count(s) > 1), None)
    if duplicate is not None:
        raise InputError(f'two input images have the stem {duplicate!r}; their outputs would overwrite each other')
    for path in images:  # every input is checked before anything is written
        image_size(path)
    trained = TrainedModel.load(checkpoint, **load_options)
    class_names, palette = trained.state['class_names'], [tuple(c) for c in trained.state['palette']]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        pixels = load_image(path)
        probs = predict_probs(trained.model, trained.transform(pixels)[None].to(trained.device), pixels.shape[-2:],
                              trained.window, flip)
        mask = probs.argmax(1)[0].cpu().numpy()
        coloured = colorize(mask, palette)
        overlay = Image.blend(Image.fromarray(pixels.permute(1, 2, 0).numpy()), coloured.convert('RGB'), alpha)
        files = {}
        for kind, picture in (('mask', coloured), ('overlay', overlay)):
            files[kind] = out_dir / f'{path.stem}_{kind}.png'
            atomic_write(files[kind], lambda tmp: picture.save(tmp, format='PNG'))
        counts = np.bincount(mask.ravel(), minlength=len(class_names))
        shares = {class_names[i]: counts[i] / mask.size for i in np.argsort(-counts)[:3] if counts[i]}
        results.append(dict(image=str(path), size=list(mask.shape[::-1]), **{k: str(v) for k, v in files.items()},
                            classes=shares))
    return results
