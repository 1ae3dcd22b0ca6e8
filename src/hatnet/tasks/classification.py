"""Image classification: any timm model (hat_net_* first) on an ImageFolder tree or the embedded digits.

Everything is timm's: ``create_transform`` (RandAugment, RandomErasing), ``Mixup`` / CutMix with
``SoftTargetCrossEntropy``, label smoothing, the eval transform from the model's pretrained cfg
(resize to ``img_size / crop_pct``, centre crop). The trainer (``hatnet.engine``) does the rest.

Inference: ``ClassificationTask.load(run)`` (or ``hatnet.load``) -> :class:`ClassificationPredictor`, whose
``predict(images)`` gives a :class:`Classification` (top-k class names and probabilities) per image.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageNetInfo, Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from ..drawing import bars_picture
from ..data.classification import check_same_classes, classification_dataset, DIGITS
from ..engine import Task, distributed, load_weights, worker_errors_unwrapped
from ..engine.checkpoint import RunCheckpoint
from ..engine.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges
from ..errors import CheckpointError, DatasetError, HatNetError
from ..fileio import save_figure
from ..models import MODEL_NAMES, guess_variant, remap_original_keys
from ..models.factory import create
from .predictor import Images, Prediction, Predictor, read_inputs, read_run

# Stochastic depth of the HAT-Net variants on ImageNet. The paper follows PVT's training code, whose values
# these are (0.1 for its tiny/small, 0.3 for its medium/large models); HAT-Net's own values are not published.
PAPER_DROP_PATH = {'hat_net_tiny': 0.1, 'hat_net_small': 0.1, 'hat_net_medium': 0.3, 'hat_net_large': 0.3}
DIGITS_IMG_SIZE = 32


@dataclass
class ClassificationConfig:
    data: str = DIGITS                        # 'digits' or an ImageFolder root with train/ and val/
    model: str = 'hat_net_tiny'               # any timm model name
    num_classes: Optional[int] = None         # default: the number of class folders
    img_size: Optional[int] = None            # default: the model's (224), 32 for the digits
    pretrained: Optional[str] = None          # original HAT-Net .pth, our .safetensors / .pth, or a run directory
    frozen_stages: int = 0                    # freeze the stem and the first N stages
    drop_path_rate: Optional[float] = None    # default: PAPER_DROP_PATH for hat_net_*, timm's default otherwise
    drop_rate: Optional[float] = None         # dropout before the classifier; default: the model's
    train_split: str = 'train'
    val_split: str = 'val'
    # training augmentation (timm create_transform)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: float = 0.4                 # not applied together with RandAugment (timm's rule)
    aa: Optional[str] = None                  # e.g. rand-m9-mstd0.5-inc1
    train_interpolation: str = 'bicubic'
    reprob: float = 0.                        # RandomErasing probability
    remode: str = 'pixel'
    recount: int = 1
    # evaluation transform; None: the model's pretrained cfg
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    # mixing and loss
    mixup: float = 0.                         # Mixup alpha (0: off)
    cutmix: float = 0.                        # CutMix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1                    # label smoothing


# the ranges of the numeric settings (checked when the task is made, before any data is read)
RANGES = dict(num_classes=Range(2), img_size=Range(32), frozen_stages=NON_NEGATIVE, drop_path_rate=FRACTION,
              drop_rate=FRACTION, scale=FRACTION, ratio=POSITIVE, hflip=FRACTION, color_jitter=NON_NEGATIVE,
              reprob=FRACTION, recount=AT_LEAST_ONE, crop_pct=POSITIVE, std=POSITIVE, mixup=NON_NEGATIVE,
              cutmix=NON_NEGATIVE, mixup_prob=FRACTION, mixup_switch_prob=FRACTION, smoothing=FRACTION)


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise HatNetError(f'unknown model {name!r}: use one of {", ".join(MODEL_NAMES)} or any timm model name')


def default_img_size(model_name: str) -> int:
    """The input size of the model's pretrained cfg (224 for the hat_net variants)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    return pretrained_cfg.input_size[-1] if pretrained_cfg else 224


def eval_data_config(model_name: str, img_size: int, crop_pct=None, interpolation=None, mean=None,
                     std=None) -> Dict[str, Any]:
    """timm's eval-transform settings from the model's pretrained cfg, with our overrides."""
    overrides = dict(input_size=(3, img_size, img_size), crop_pct=crop_pct, interpolation=interpolation,
                     mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None},
                                 pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def eval_transform(data_config: Dict[str, Any]):
    return create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})


def class_names_for(num_classes: int, names: Optional[List[str]] = None) -> List[str]:
    """Stored names; ImageNet-1k names for 1000 classes (timm's ImageNetInfo, offline); else the indices."""
    if names:
        return list(names) + [str(i) for i in range(len(names), num_classes)]
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]


class ClassificationTask(Task):
    name = 'classification'
    primary_metric = 'top1'

    def __init__(self, config: ClassificationConfig):
        self.config = cfg = config
        check_ranges(cfg, RANGES)
        _check_model_name(cfg.model)
        self.img_size = cfg.img_size or (DIGITS_IMG_SIZE if cfg.data == DIGITS else default_img_size(cfg.model))
        self.data_config = eval_data_config(cfg.model, self.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean,
                                            cfg.std)
        self.num_classes = 0  # known once the data is: build_datasets
        self.mixup = None     # built with the data too: it needs the number of classes
        if self.mixing:
            self.criterion = SoftTargetCrossEntropy()  # mixed soft targets already carry the smoothing
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix is on."""
        return self.config.mixup > 0 or self.config.cutmix > 0

    def build_datasets(self):
        cfg = self.config
        train_transform = create_transform(
            self.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=cfg.train_interpolation,
            mean=tuple(self.data_config['mean']), std=tuple(self.data_config['std']), re_prob=cfg.reprob,
            re_mode=cfg.remode, re_count=cfg.recount)
        train = classification_dataset(cfg.data, cfg.train_split, train_transform, self.img_size)
        val = classification_dataset(cfg.data, cfg.val_split, eval_transform(self.data_config), self.img_size)
        check_same_classes(train.classes, val.classes, f'{cfg.data}/{cfg.train_split}', f'{cfg.data}/{cfg.val_split}')
        self.class_names = list(train.classes)
        if len(self.class_names) < 2:
            raise DatasetError(f'{cfg.data}/{cfg.train_split} has one class ({self.class_names[0]}): a classifier '
                               f'needs at least two (every prediction would be right)')
        self.num_classes = cfg.num_classes or len(self.class_names)
        if self.num_classes < len(self.class_names):
            raise DatasetError(f'--num-classes {self.num_classes} is fewer than the {len(self.class_names)} classes '
                               f'of {cfg.data}')
        if self.mixing:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=self.num_classes)
        return train, val

    def build_model(self) -> nn.Module:
        cfg = self.config
        drop_path = cfg.drop_path_rate if cfg.drop_path_rate is not None else PAPER_DROP_PATH.get(cfg.model)
        kwargs = {} if cfg.drop_rate is None else dict(drop_rate=cfg.drop_rate)
        return create(cfg.model, cfg.pretrained, num_classes=self.num_classes, drop_path_rate=drop_path,
                      frozen_stages=cfg.frozen_stages, **kwargs)

    def train_step(self, model, batch, device):
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        scalars = {}
        if self.mixup is not None:
            if len(images) % 2:
                raise HatNetError(f'mixup / cutmix need an even batch size, got {len(images)}')
            images, targets = self.mixup(images, targets)
        logits = model(images)
        if self.mixup is None:
            scalars['top1'] = (logits.argmax(1) == targets).float().mean()
        return self.criterion(logits, targets), scalars

    def evaluate(self, model, loader, device):
        return summarize(*confusion_matrix(model, loader, device, self.num_classes))

    def state(self) -> Dict[str, Any]:
        return dict(super().state(), num_classes=self.num_classes, data_config=self.data_config)

    @classmethod
    def load(cls, run_or_checkpoint, device: str = 'auto', model: Optional[str] = None,
             img_size: Optional[int] = None, amp: str = 'none') -> 'ClassificationPredictor':
        """A classifier for inference from a run directory (its best checkpoint), one of its checkpoints, or a bare
        weights file: an original HAT-Net .pth, a hatnet .safetensors (the variant is recognised) or a timm
        checkpoint of the model named by ``model``. ``img_size``: the eval input size (default: the run's or
        the model's); ``amp``: 'bf16' or 'fp16' to predict under autocast (see :class:`Predictor`)."""
        run = read_run(run_or_checkpoint, cls.name, bare_weights=True)
        load_fn = _load_run if run.task else _load_weights_file
        return load_fn(run, device, model, img_size, amp)


def _load_run(run: RunCheckpoint, device, model_name: Optional[str], img_size: Optional[int], amp: str):
    state = run.task_state
    if model_name and model_name != state['model']:
        raise CheckpointError(f'{run.path} holds a {state["model"]}, not a {model_name}')
    model_name, num_classes = state['model'], state['num_classes']
    model = create(model_name, num_classes=num_classes)
    load_weights(model, run.state_dict, source=str(run.path))
    data_config = dict(state['data_config'])
    if img_size:
        data_config = eval_data_config(model_name, img_size, data_config['crop_pct'], data_config['interpolation'],
                                       data_config['mean'], data_config['std'])
    return ClassificationPredictor(model, class_names_for(num_classes, state['class_names']), device, amp,
                                   model_name=model_name, data_config=data_config,
                                   trained_classes=state['class_names'], trained_data=run.config.get('data'))


def _load_weights_file(run: RunCheckpoint, device, model_name: Optional[str], img_size: Optional[int], amp: str):
    weights = remap_original_keys(run.state_dict)
    model_name = model_name or guess_variant(weights)
    if model_name is None:
        raise CheckpointError(f'{run.path} is not a HAT-Net checkpoint: pass --model with its timm name')
    _check_model_name(model_name)
    classifier = getattr(timm.models.get_pretrained_cfg(model_name), 'classifier', None) or 'head'
    if f'{classifier}.weight' not in weights:
        raise CheckpointError(f'{run.path} has no classifier ({classifier}.weight): not a classification checkpoint')
    model = create(model_name, weights, source=str(run.path))  # as many classes as its classifier has
    data_config = eval_data_config(model_name, img_size or default_img_size(model_name))
    return ClassificationPredictor(model, class_names_for(model.num_classes), device, amp, model_name=model_name,
                                   data_config=data_config)


# ---------------------------------------------------------------------------------------------- evaluation
def confusion_matrix(model: nn.Module, loader, device, num_classes: int) -> Tuple[torch.Tensor, float, float]:
    """(confusion matrix [true, predicted], top-5 hits, summed cross-entropy), summed over all processes."""
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    top5 = loss = 0.
    for images, targets in loader:
        logits = model(images.to(device)).float().cpu()
        loss += F.cross_entropy(logits, targets, reduction='sum').item()
        confusion += torch.bincount(targets * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        top5 += (logits.topk(min(5, num_classes), dim=1).indices == targets[:, None]).any(1).sum().item()
    reduced = distributed.all_reduce_sum(torch.cat([confusion, torch.tensor([top5, loss], dtype=torch.float64)]))
    return reduced[:-2].reshape(num_classes, num_classes), reduced[-2].item(), reduced[-1].item()


def summarize(confusion: torch.Tensor, top5: float, loss: float) -> Dict[str, float]:
    """top1 / top5 (fractions), mean per-class accuracy and mean loss from ``confusion_matrix``'s result."""
    total = confusion.sum().item()
    if total == 0:
        raise DatasetError('the evaluation set is empty')
    per_class = per_class_accuracy(confusion)
    return dict(top1=confusion.trace().item() / total, top5=top5 / total, loss=loss / total,
                mean_class_acc=float(np.nanmean(per_class)))


def per_class_accuracy(confusion: torch.Tensor) -> np.ndarray:
    """Recall of each class (NaN for classes without images)."""
    counts = confusion.sum(1).numpy()
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(counts > 0, confusion.diagonal().numpy() / counts, np.nan)


def plot_confusion_matrix(confusion: torch.Tensor, class_names: List[str], path, title: str = '') -> None:
    """Row-normalised confusion matrix as a PNG (class names on the axes up to 40 classes)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    counts = confusion.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    size = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow((confusion / counts).numpy(), cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if max(map(len, class_names)) > 2 else 0)
        ax.set_yticks(range(n), class_names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if confusion[i, j] > 0:
                        ax.text(j, i, int(confusion[i, j]), ha='center', va='center', fontsize=8,
                                color='white' if confusion[i, j] / counts[i, 0] > 0.5 else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- inference
@dataclass
class Classification(Prediction):
    """The top-k classes of one image, most probable first."""
    labels: List[str]        # class names
    indices: List[int]       # class indices (the model's outputs)
    scores: List[float]      # softmax probabilities

    def draw(self) -> Image.Image:
        """The input image with a bar per class of the top-k."""
        return bars_picture(self.input_picture(), self.labels, self.scores)

    def to_dict(self) -> Dict[str, Any]:
        """What ``hatnet predict --json`` prints for the image."""
        return dict(image=self.image, predictions=[dict(index=i, name=name, probability=p)
                                                   for i, name, p in zip(self.indices, self.labels, self.scores)])


class ClassificationPredictor(Predictor):
    """A classifier with its class names and eval transform (see :meth:`ClassificationTask.load`)."""
    task = ClassificationTask.name

    def __init__(self, model: nn.Module, class_names: List[str], device='auto', amp: str = 'none', *,
                 model_name: str, data_config: Dict[str, Any], trained_classes: Optional[List[str]] = None,
                 trained_data: Optional[str] = None):
        super().__init__(model, class_names, device, amp)
        self.model_name = model_name
        self.data_config = data_config  # timm's eval transform settings (input size, crop, mean / std, ...)
        self.transform = eval_transform(data_config)
        self.trained_classes = trained_classes  # the classes of the data it was trained on (our runs)
        self.trained_data = trained_data        # that data ('digits' or a folder), if known

    @torch.no_grad()
    def predict(self, images: Images, top_k: int = 5, batch_size: int = 32) -> List[Classification]:
        """The ``top_k`` most probable classes of each image."""
        inputs = read_inputs(images)
        results = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            batch = torch.stack([self.transform(picture) for _, picture in chunk]).to(self.device)
            with self.autocast():
                logits = self.model(batch)
            probs = logits.float().softmax(1).cpu()
            values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
            results += [Classification(source, [self.class_names[i] for i in row], row, scores, picture=picture)
                        for (source, picture), row, scores in zip(chunk, indices.tolist(), values.tolist())]
        return results

    def evaluate(self, data: str, split: str = 'val', batch_size: int = 64, workers: int = 2) -> Dict[str, Any]:
        """top1, top5 (fractions), loss, mean_class_acc, images, per_class (accuracy of each class with images),
        class_names and the confusion matrix (rows: true class, columns: predicted) on one split of ``data``."""
        dataset = classification_dataset(data, split, self.transform, img_size=self.data_config['input_size'][-1])
        num_classes = len(self.class_names)
        if len(dataset.classes) > num_classes:
            raise DatasetError(f'{data} has {len(dataset.classes)} classes, the model only {num_classes} outputs')
        if self.trained_classes is not None:
            check_same_classes(self.trained_classes, dataset.classes, 'the checkpoint', f'{data}/{split}')
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        with torch.no_grad(), self.autocast(), worker_errors_unwrapped():
            confusion, top5, loss = confusion_matrix(self.model, loader, self.device, num_classes)
        # without stored names (or ImageNet's), the data's folder names are the best labels for the report
        names = self.class_names if self.trained_classes or num_classes == 1000 else class_names_for(
            num_classes, dataset.classes)
        counts = confusion.sum(1).tolist()
        per_class = {name: float(accuracy) for name, n, accuracy in zip(names, counts, per_class_accuracy(confusion))
                     if n > 0}
        return dict(summarize(confusion, top5, loss), images=int(sum(counts)), per_class=per_class, class_names=names,
                    confusion=confusion.long().tolist())
