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

Inference: ``SegmentationTask.load(run)`` (or ``hatnet.load``) -> :class:`SegmentationPredictor`, whose
``predict(images)`` gives a :class:`Segmentation` (a class-index mask at the image's size) per image.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from ..data.images import image_size
from ..drawing import add_legend
from ..data.segmentation import (
    LAYOUTS, MAX_SIDE_RATIO, SegmentationData, SegmentationDataset, collate, colorize, eval_transform, find_samples,
    get_layout, load_data, make_palette, train_transform)
from ..engine import Task, distributed, load_weights, worker_errors_unwrapped
from ..engine.config import FRACTION, NON_NEGATIVE, POSITIVE, Range, TrainConfig, check_ranges
from ..engine.fitting import Choice, launched_processes
from ..errors import DatasetError, HatNetError
from ..fileio import atomic_write
from ..models.hat_net import MIN_INPUT_SIZE
from ..models.semantic_fpn import SemanticFPN
from ..models.unet import UNetDecoder
from .predictor import Images, Prediction, Predictor, check_resized_size, read_inputs, read_run


@dataclass
class SegmentationConfig:
    """The segmentation task's own recipe keys (the trainer's are :class:`hatnet.engine.TrainConfig`)."""
    data: str = ''
    layout: str = 'ade20k'              # ade20k | folders (see hatnet.data.segmentation)
    model: str = 'hat_net_tiny'         # backbone: a hat_net variant or any timm features_only model
    pretrained: Optional[str] = None    # ImageNet weights of the backbone: a file or a classification run
    frozen_stages: int = 0              # freeze the backbone's stem and first N stages
    num_classes: int = 0                # 0: read from the data
    crop_size: int = 512                # training crops
    short_side: int = 512               # test scale; training scales are short_side x U(ratio_range)
    ratio_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75         # crop rule: no single class covers more of a crop (1 = off)
    head: str = 'fpn'                   # fpn (Semantic FPN, the paper's) | unet (U-Net decoder)
    norm: str = 'gn'                    # head norm: gn | bn
    drop_path_rate: Optional[float] = 0.1  # backbone stochastic depth (null: the backbone's default)
    slide: bool = False                 # sliding-window evaluation (windows of crop_size, stride 2/3 of it)
    flip: bool = False                  # average with the horizontally flipped image at evaluation


# the ranges of the numeric settings (checked when the task is made, before any data is read)
RANGES = dict(num_classes=NON_NEGATIVE, crop_size=Range(32), short_side=Range(32), ratio_range=POSITIVE,
              cat_max_ratio=Range(0, 1, low_open=True), frozen_stages=NON_NEGATIVE, drop_path_rate=FRACTION)


HEADS = dict(fpn=SemanticFPN, unet=UNetDecoder)


def build_segmenter(head: str, backbone: str, num_classes: int, **kwargs) -> nn.Module:
    """The segmentation model of ``head`` (a key of :data:`HEADS`) on the timm ``backbone``."""
    return HEADS[head](backbone, num_classes, **kwargs)


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
            out = model(image[..., top:top + window, left:left + window]).float()  # summed in float32 under autocast
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
    # imported here: torchmetrics takes a second to import, which every `hatnet` command would pay
    from torchmetrics.functional.classification import multiclass_confusion_matrix

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


# The ``auto`` recipe (hatnet.engine.fitting): what the ADE20K recipe cannot know about other data.
SIZE_SAMPLE = 200            # images whose headers are read to learn the data's sizes
PAPER_SIZED = 0.75           # images with a median short side of at least this times the recipe's test scale
PAPER_IMAGES = 1000          # ... and at least this many of them are ADE20K-like: the recipe is kept as it is
CPU_BATCH = 16               # images per step on a CPU: from scratch, 600 steps of 16 learned more than of 8
                             # (docs/segmentation.md); ~1 s per step at 128 px for hat_net_tiny on 2 cores
MIN_BN_BATCH = 8             # the head keeps the recipe's BatchNorm from this batch on (at 8 it fits the
                             # training images a little faster than GroupNorm and validates the same)
SCRATCH_LR = 1e-3            # AdamW peak lr of a randomly initialised backbone at batch CPU_BATCH (2x learned less)
SMALL_DATA_EPOCHS = 16       # passes over a small dataset when the user gives no length
MIN_ITERS = 600


def _detect_layout(task_cfg: 'SegmentationConfig') -> Optional[str]:
    """The layout whose folders the dataset has, if it is not the configured one and exactly one fits."""
    root = Path(task_cfg.data)
    fits = [name for name, spec in LAYOUTS.items() if (root / spec.masks / spec.splits[0]).is_dir()]
    return fits[0] if len(fits) == 1 and fits[0] != task_cfg.layout else None


def _data_sizes(root: Path, layout: str) -> Tuple[int, List[int]]:
    """(number of training images, short sides of up to SIZE_SAMPLE of them, spread over the split), from
    the image headers."""
    samples = find_samples(root, layout, get_layout(layout).splits[0])
    step = max(1, len(samples) // SIZE_SAMPLE)
    return len(samples), [min(image_size(image, DatasetError)) for image, _ in samples[::step]]


def _round(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


def fit_recipe(task_cfg: 'SegmentationConfig', train_cfg: TrainConfig, given: frozenset,
               device: torch.device) -> List[Choice]:
    """The ``auto`` recipe's choices for this data (sizes and number of images) and device; see
    :mod:`hatnet.engine.fitting`. ``given``: the settings the user passed, which the engine never overrides
    and which the other choices follow (e.g. the lr of a given batch size). ADE20K-like data (many images
    about as large as the recipe's scale) keeps the paper's recipe."""
    if not Path(task_cfg.data).is_dir():
        raise DatasetError(f'dataset folder not found: {task_cfg.data}')
    choices = []
    choose = lambda key, value, why: choices.append(Choice(key, value, why))  # noqa: E731
    layout = task_cfg.layout
    detected = None if 'layout' in given else _detect_layout(task_cfg)
    if detected:
        layout = detected
        spec = LAYOUTS[layout]
        choose('layout', layout, f'the data has {spec.images}/ and {spec.masks}/{spec.splits[0]}/ folders')
    images, short_sides = _data_sizes(Path(task_cfg.data), layout)
    short = float(np.median(short_sides))
    if short >= PAPER_SIZED * task_cfg.short_side and images >= PAPER_IMAGES:
        return choices

    # scale: the data's own size; the recipe would upsample a 128 px image four times to 512
    short_side = task_cfg.short_side
    if 'short_side' not in given and short < PAPER_SIZED * task_cfg.short_side:
        # up to a multiple of 32: rounding down would shrink most images and the shapes in them
        short_side = min(task_cfg.short_side, 32 * math.ceil(short / 32))
        choose('short_side', short_side, f'images have a median short side of {short:.0f} px: test scale '
                                         f'{short_side} instead of {task_cfg.short_side}')
    crop_size = task_cfg.crop_size if 'crop_size' in given else min(task_cfg.crop_size, short_side)
    if crop_size != task_cfg.crop_size:
        choose('crop_size', crop_size, f'training crops of the test scale, {crop_size} px')
    scratch = task_cfg.pretrained is None
    if scratch:
        choose('ratio_range', [1.0, 1.0], 'backbone from scratch on a short schedule: training at the test scale '
                                          '(scale jitter slowed it down without helping the held-out score)')
    elif short_side < PAPER_SIZED * SegmentationConfig.short_side:
        # training scales 0.5-2x of a small image make shapes of a few pixels or crops of a few parts of one
        choose('ratio_range', [0.75, 1.5], 'small images: training scales 0.75-1.5x instead of 0.5-2x')

    batch = train_cfg.batch_size
    if 'batch_size' not in given and device.type == 'cpu' and batch > CPU_BATCH:
        batch = CPU_BATCH
        choose('batch_size', batch, f'{batch} images per step on a CPU; the recipe\'s {train_cfg.batch_size} are '
                                    f'for GPUs')
    if 'norm' not in given and task_cfg.norm == 'bn' and batch < MIN_BN_BATCH:
        choose('norm', 'gn', f'GroupNorm in the head: batch statistics of {batch} images are too noisy')

    global_batch = batch * launched_processes() * train_cfg.accum_steps
    iters = train_cfg.iters
    if not ({'iters', 'epochs'} & given):
        iters = min(iters or MIN_ITERS, max(MIN_ITERS, _round(SMALL_DATA_EPOCHS * images / global_batch, 100)))
        if iters != train_cfg.iters:
            choose('iters', iters, f'{images} training images: {iters} steps; the recipe\'s {train_cfg.iters} are '
                                   f'for ADE20K\'s 20k')
    if iters and train_cfg.eval_every > iters // 2 and 'eval_every' not in given:
        every = max(1, _round(iters / 6, 50) if iters >= 300 else iters // 3)
        choose('eval_every', every, f'evaluate about six times in {iters} steps')
        if 'save_every' not in given:
            choose('save_every', every, 'checkpoint at every evaluation')

    if scratch:
        if 'head' not in given and task_cfg.head == 'fpn':
            choose('head', 'unet', 'backbone from scratch: a U-Net decoder, which learns from few images far faster '
                                   'than Semantic FPN')
        if task_cfg.drop_path_rate:
            choose('drop_path_rate', 0.0, 'backbone from scratch on a short schedule: no stochastic depth')
        lr_base = train_cfg.lr_base_size
        if 'lr' not in given:
            # SCRATCH_LR holds at CPU_BATCH images, scaled linearly: for lr_base_size images if set (the
            # trainer scales it to the batch), else for the batch itself
            lr = SCRATCH_LR * (lr_base or global_batch) / CPU_BATCH
            per = f' (the value is per {lr_base} images: the recipe scales lr to the batch)' if lr_base else ''
            choose('lr', lr, f'backbone from scratch: lr {SCRATCH_LR * global_batch / CPU_BATCH:g} at this batch of '
                             f'{global_batch}{per}; the recipe\'s {train_cfg.lr:g} fine-tunes ImageNet weights')
        if 'warmup_iters' not in given and iters:
            warmup = max(10, iters // 20)
            choose('warmup_iters', warmup, f'backbone from scratch: {warmup} warm-up steps')
        if 'clip_grad' not in given and train_cfg.clip_grad is None:
            choose('clip_grad', 1.0, 'backbone from scratch: gradient norm clipped at 1')
    return [choice for choice in choices if choice.key not in given]


class SegmentationTask(Task):
    name = 'segmentation'
    primary_metric = 'mIoU'
    collate_fn = staticmethod(collate)

    def __init__(self, config: SegmentationConfig):
        check_ranges(config, RANGES)
        if len(config.ratio_range) != 2 or config.ratio_range[0] > config.ratio_range[1]:
            raise HatNetError(f'ratio_range must be [low, high], got {config.ratio_range}')
        if config.norm not in ('gn', 'bn'):
            raise HatNetError(f"norm must be 'gn' or 'bn', got {config.norm!r}")
        if config.head not in HEADS:
            raise HatNetError(f"head must be one of {', '.join(HEADS)}, got {config.head!r}")
        get_layout(config.layout)
        self.config = config
        self.data: Optional[SegmentationData] = None  # the checked dataset: build_datasets

    def build_datasets(self):
        cfg = self.config
        self.data = data = load_data(cfg.data, cfg.layout, num_classes=cfg.num_classes or None)
        self.class_names = data.class_names
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

    def build_model(self) -> nn.Module:
        cfg = self.config
        model = build_segmenter(cfg.head, cfg.model, self.data.num_classes, pretrained=cfg.pretrained, norm=cfg.norm,
                                drop_path_rate=cfg.drop_path_rate, frozen_stages=cfg.frozen_stages)
        if cfg.norm == 'bn' and distributed.is_distributed() and torch.distributed.get_backend() == 'nccl':
            # batch statistics over the global batch, as mmsegmentation's SyncBN (CUDA only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

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
        return dict(super().state(), ignore_index=self.data.ignore_index,
                    palette=[list(c) for c in self.data.palette])

    @classmethod
    def load(cls, run_or_checkpoint, device: str = 'auto', short_side: Optional[int] = None, slide: bool = False,
             window: Optional[int] = None, amp: str = 'none') -> 'SegmentationPredictor':
        """A segmenter for inference from a run directory (its best checkpoint) or a checkpoint file of ``hatnet seg
        train``. ``short_side``: the test scale (default: the run's); ``slide``: sliding-window inference with
        windows of ``window`` pixels (default: the run's crop size); ``amp``: 'bf16' or 'fp16' to segment under
        autocast (see :class:`Predictor`)."""
        run = read_run(run_or_checkpoint, cls.name)
        state = run.task_state
        cfg = state['config']
        model = build_segmenter(cfg.get('head', 'fpn'), cfg['model'], len(state['class_names']), norm=cfg['norm'])
        load_weights(model, run.state_dict, source=str(run.path))
        return SegmentationPredictor(
            model, state['class_names'], device, amp, model_name=cfg['model'], layout=cfg['layout'],
            palette=[tuple(c) for c in state['palette']],
            short_side=short_side or cfg['short_side'], window=(window or cfg['crop_size']) if slide else 0)


@dataclass
class Segmentation(Prediction):
    """The class of every pixel of one image."""
    mask: np.ndarray                        # (H, W) class indices at the image's size
    class_names: List[str]                  # the run's classes: mask value i is class_names[i]
    palette: List[Tuple[int, int, int]] = field(repr=False)  # the run's colour of each class

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height)."""
        return self.mask.shape[1], self.mask.shape[0]

    def shares(self, top: int = 3) -> Dict[str, float]:
        """The ``top`` classes covering most of the image, with the fraction of the pixels each covers."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.class_names))
        return {self.class_names[i]: float(counts[i] / self.mask.size) for i in np.argsort(-counts)[:top] if counts[i]}

    def colorized(self) -> Image.Image:
        """The mask in the run's colours (a palette image: its pixel values are the class indices)."""
        return colorize(self.mask, self.palette)

    def overlay(self, alpha: float = 0.5, legend: bool = False) -> Image.Image:
        """The input image with the colours of the predicted classes blended over it (``alpha``: their
        opacity). Pixels of a class named 'background' keep the photo as it is; ``legend``: a swatch and the
        name of every painted class below the image, largest first."""
        photo = self.input_picture()
        background = [i for i, name in enumerate(self.class_names) if name.lower() == 'background']
        painted = ~np.isin(self.mask, background)
        blended = Image.blend(photo, self.colorized().convert('RGB'), alpha)
        picture = Image.composite(blended, photo, Image.fromarray(painted.astype(np.uint8) * 255, mode='L'))
        if not legend:
            return picture
        counts = np.bincount(self.mask[painted], minlength=len(self.class_names))
        return add_legend(picture, [(self.class_names[i], self.palette[i]) for i in np.argsort(-counts) if counts[i]])

    def label_image(self) -> Image.Image:
        """The class indices as a single-channel image: 8-bit (mode L) for up to 256 classes, else 16-bit."""
        if len(self.class_names) <= 256:
            return Image.fromarray(self.mask.astype(np.uint8), mode='L')
        return Image.fromarray(self.mask.astype(np.uint16), mode='I;16')

    @staticmethod
    def files(out_dir, stem: str) -> Dict[str, Path]:
        """The files :meth:`save` writes, by kind: ``<stem>_mask.png`` (:meth:`colorized`), ``<stem>_overlay.png``
        (:meth:`overlay`) and ``<stem>_labels.png`` (:meth:`label_image`, the class index of every pixel, as the
        dataset masks store them)."""
        return {kind: Path(out_dir) / f'{stem}_{kind}.png' for kind in ('mask', 'overlay', 'labels')}

    def save(self, out_dir, stem: str, alpha: float = 0.5) -> Dict[str, Path]:
        """Write the label image, the colour mask and the overlay to ``out_dir`` as :meth:`files` names them;
        returns their paths by kind."""
        files = self.files(out_dir, stem)
        pictures = dict(labels=self.label_image(), mask=self.colorized(), overlay=self.overlay(alpha, legend=True))
        for kind, picture in pictures.items():
            atomic_write(files[kind], lambda tmp: picture.save(tmp, format='PNG'))
        return files

    def to_dict(self) -> Dict[str, Any]:
        """The image, its size [width, height] and the three classes covering most of it (fractions)."""
        return dict(image=self.image, size=list(self.size), classes=self.shares())


class SegmentationPredictor(Predictor):
    """A Semantic FPN with the run's classes, colours and test-time settings (see :meth:`SegmentationTask.load`)."""
    task = SegmentationTask.name

    def __init__(self, model: nn.Module, class_names: List[str], device='auto', amp: str = 'none', *,
                 model_name: str, layout: str = 'ade20k', palette: Optional[List[Tuple[int, int, int]]] = None,
                 short_side: int = 512, window: int = 0):
        super().__init__(model, class_names, device, amp)
        self.model_name = model_name  # the backbone: its input normalisation
        self.layout = layout          # of the run's data: what evaluate() expects by default
        self.palette = palette or make_palette(len(self.class_names))
        self.short_side = short_side  # test scale
        self.window = window          # sliding-window side, 0 for whole-image inference
        self.transform = eval_transform(short_side, *normalization(model_name))

    def check_input(self, source: Optional[str], picture: Image.Image) -> None:
        """An image that the test scale would leave under the model's 32 px (a long, thin one) is refused."""
        check_resized_size([(source, picture)], self.short_side, MAX_SIDE_RATIO * self.short_side, MIN_INPUT_SIZE)

    def predict(self, images: Images, flip: bool = False) -> List[Segmentation]:
        """The class of every pixel (``flip``: averaged with the horizontally flipped image). Every image is read
        and checked before any is segmented."""
        inputs = read_inputs(images)
        for source, picture in inputs:
            self.check_input(source, picture)
        results = []
        for source, picture in inputs:
            pixels = tv_tensors.Image(pil_to_tensor(picture))
            with self.autocast():
                probs = predict_probs(self.model, self.transform(pixels)[None].to(self.device), pixels.shape[-2:],
                                      self.window, flip)
            results.append(Segmentation(source, probs.argmax(1)[0].cpu().numpy(), self.class_names, self.palette,
                                        picture=picture))
        return results

    def evaluate(self, data, layout: Optional[str] = None, split: Optional[str] = None, flip: bool = False,
                 workers: int = 2, progress: bool = False) -> Dict[str, Any]:
        """mIoU, mAcc, aAcc (fractions), per_class (IoU and Acc of each class; NaN where a class occurs nowhere)
        on one split of a dataset (default: the run's layout and its validation split), and the settings used:
        split, images, short_side, window, flip."""
        from tqdm import tqdm
        layout = layout or self.layout
        split = split or get_layout(layout).splits[1]
        checked = load_data(data, layout, splits=[split], num_classes=len(self.class_names))
        dataset = SegmentationDataset(checked.samples[split], self.transform, checked.ignore_index,
                                      checked.reduce_zero_label, joint=False)
        loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate)
        with tqdm(total=len(dataset), desc=f'evaluating {split}', unit='img', disable=not progress) as bar, \
                self.autocast(), worker_errors_unwrapped():
            confusion = confusion_matrix(self.model, loader, self.device, checked.num_classes,
                                         checked.ignore_index, self.window, flip, progress=lambda: bar.update(1))
        metrics = segmentation_metrics(confusion)
        per_class = {name: dict(IoU=iou, Acc=acc)
                     for name, iou, acc in zip(self.class_names, metrics['IoU'], metrics['Acc'])}
        return dict(mIoU=metrics['mIoU'], mAcc=metrics['mAcc'], aAcc=metrics['aAcc'], per_class=per_class, split=split,
                    images=len(dataset), short_side=self.short_side, window=self.window, flip=flip)
