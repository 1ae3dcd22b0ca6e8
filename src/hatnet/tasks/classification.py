"""Image classification: any timm model (hat_net_* first) on an ImageFolder tree or the embedded digits.

Everything is timm's: ``create_transform`` (RandAugment, RandomErasing), ``Mixup`` / CutMix with
``SoftTargetCrossEntropy``, label smoothing, the eval transform from the model's pretrained cfg
(resize to ``img_size / crop_pct``, centre crop). The trainer (``hatnet.engine``) does the rest.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..data.classification import check_same_classes, classification_dataset, dataset_classes, DIGITS
from ..engine import Task, distributed, load_run_checkpoint, load_weights, worker_errors_unwrapped
from ..errors import CheckpointError, DatasetError, HatNetError
from ..models import MODEL_NAMES, guess_variant
from ..models.hat_net import grid_attention, remap_original_keys

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
    freeze_stages: int = 0                    # freeze the stem and the first N stages
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


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise HatNetError(f'unknown model {name!r}: use one of {", ".join(MODEL_NAMES)} or any timm model name')


def create_classifier(name: str, num_classes: int, weights: Optional[Dict[str, torch.Tensor]] = None,
                      source: str = '', **kwargs) -> nn.Module:
    """A timm classifier; with ``weights`` (e.g. an original HAT-Net checkpoint) everything but a classifier
    of another size is loaded, and the classifier is then freshly initialised."""
    _check_model_name(name)
    if weights is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    if name in MODEL_NAMES:
        weights = remap_original_keys(weights)
    classifier = getattr(timm.models.get_pretrained_cfg(name), 'classifier', None) or 'head'
    head = weights.get(f'{classifier}.weight')
    # timm keeps the classifier when its size equals the overlay's num_classes, and drops it otherwise
    overlay = dict(state_dict=weights, num_classes=head.shape[0] if head is not None else 0)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 **kwargs)
    except RuntimeError as e:  # from load_state_dict, for models without their own checks
        raise CheckpointError(f'{source} does not fit {name}: {str(e).strip().splitlines()[-1].strip()}') from None


def freeze_stages(model: nn.Module, num_stages: int) -> None:
    """Freeze the stem and the first ``num_stages`` stages (no gradients, frozen BatchNorm statistics)."""
    if num_stages <= 0:
        return
    if not (hasattr(model, 'stem') and hasattr(model, 'stages')):
        raise HatNetError(f'--freeze-stages needs a model with .stem and .stages; {type(model).__name__} has not')
    if num_stages > len(model.stages):
        raise HatNetError(f'--freeze-stages {num_stages}: the model has {len(model.stages)} stages')
    timm.utils.freeze(model, ['stem'] + [f'stages.{i}' for i in range(num_stages)])


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
        _check_model_name(cfg.model)
        self.classes = dataset_classes(cfg.data, cfg.train_split)
        self.num_classes = cfg.num_classes or len(self.classes)
        if self.num_classes < len(self.classes):
            raise DatasetError(f'--num-classes {self.num_classes} is fewer than the {len(self.classes)} classes '
                               f'of {cfg.data}')
        self.img_size = cfg.img_size or (DIGITS_IMG_SIZE if cfg.data == DIGITS else default_img_size(cfg.model))
        self.data_config = eval_data_config(cfg.model, self.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean,
                                            cfg.std)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()  # mixed soft targets already carry the smoothing
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def build_model(self) -> nn.Module:
        cfg = self.config
        kwargs = {}
        drop_path = cfg.drop_path_rate if cfg.drop_path_rate is not None else PAPER_DROP_PATH.get(cfg.model)
        if drop_path is not None:
            kwargs['drop_path_rate'] = drop_path
        if cfg.drop_rate is not None:
            kwargs['drop_rate'] = cfg.drop_rate
        weights = load_run_checkpoint(cfg.pretrained).state_dict if cfg.pretrained else None
        model = create_classifier(cfg.model, self.num_classes, weights, source=cfg.pretrained or '', **kwargs)
        freeze_stages(model, cfg.freeze_stages)
        return model

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
        return train, val

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
        return dict(model=self.config.model, num_classes=self.num_classes, class_names=self.classes,
                    data_config=self.data_config)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- inference
@dataclass
class Classifier:
    """A model ready for evaluation or prediction, with what is known about its outputs and inputs."""
    model: nn.Module
    model_name: str
    class_names: List[str]                 # one per output: trained classes, ImageNet's, or the indices
    data_config: Dict[str, Any]
    trained_classes: Optional[List[str]]   # the classes of the data it was trained on (our checkpoints)
    trained_data: Optional[str] = None     # that data ('digits' or a folder), if known


def load_classifier(checkpoint, model_name: Optional[str] = None, img_size: Optional[int] = None,
                    device: torch.device = torch.device('cpu')) -> Classifier:
    """A run directory (its best checkpoint), one of our checkpoints, or a bare weights file (an original
    HAT-Net .pth, a safetensors file, ...; the variant is recognised for hat_net weights) -> eval-mode model."""
    loaded = load_run_checkpoint(checkpoint, task='classification')
    state = loaded.task_state
    if loaded.task:
        if model_name and model_name != state['model']:
            raise CheckpointError(f'{loaded.path} holds a {state["model"]}, not a {model_name}')
        model_name, num_classes = state['model'], state['num_classes']
        model = create_classifier(model_name, num_classes)
        load_weights(model, loaded.state_dict, source=str(loaded.path))
        trained_classes = state['class_names']
        data_config = dict(state['data_config'])
        if img_size:
            data_config = eval_data_config(model_name, img_size, data_config['crop_pct'],
                                           data_config['interpolation'], data_config['mean'], data_config['std'])
    else:
        weights = remap_original_keys(loaded.state_dict)
        model_name = model_name or guess_variant(weights)
        if model_name is None:
            raise CheckpointError(f'{loaded.path} is not a HAT-Net checkpoint: pass --model with its timm name')
        _check_model_name(model_name)
        classifier = getattr(timm.models.get_pretrained_cfg(model_name), 'classifier', None) or 'head'
        if f'{classifier}.weight' not in weights:
            raise CheckpointError(f'{loaded.path} has no classifier ({classifier}.weight): not a classification '
                                  f'checkpoint')
        num_classes = weights[f'{classifier}.weight'].shape[0]
        model = create_classifier(model_name, num_classes, weights, source=str(loaded.path))
        trained_classes = None
        data_config = eval_data_config(model_name, img_size or default_img_size(model_name))
    return Classifier(model.to(device).eval(), model_name, class_names_for(num_classes, trained_classes),
                      data_config, trained_classes, loaded.config.get('data'))


def evaluate_classifier(classifier: Classifier, data: str, split: str = 'val', batch_size: int = 64,
                        workers: int = 2) -> Tuple[Dict[str, float], torch.Tensor, List[str]]:
    """(metrics, confusion matrix, class names) of a classifier on one split of a dataset."""
    from torch.utils.data import DataLoader

    dataset = classification_dataset(data, split, eval_transform(classifier.data_config),
                                     img_size=classifier.data_config['input_size'][-1])
    num_classes = len(classifier.class_names)
    if len(dataset.classes) > num_classes:
        raise DatasetError(f'{data} has {len(dataset.classes)} classes, the model only {num_classes} outputs')
    if classifier.trained_classes is not None:
        check_same_classes(classifier.trained_classes, dataset.classes, 'the checkpoint', f'{data}/{split}')
    device = next(classifier.model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    with torch.no_grad(), worker_errors_unwrapped():
        confusion, top5, loss = confusion_matrix(classifier.model, loader, device, num_classes)
    # without stored names (or ImageNet's), the data's folder names are the best labels for the report
    names = classifier.class_names if classifier.trained_classes or num_classes == 1000 else class_names_for(
        num_classes, dataset.classes)
    return summarize(confusion, top5, loss), confusion, names


def predict(classifier: Classifier, images: torch.Tensor, top_k: int = 5) -> List[List[Tuple[int, str, float]]]:
    """Top-k (class index, class name, probability) for each image of a transformed batch."""
    device = next(classifier.model.parameters()).device
    with torch.no_grad():
        probs = classifier.model(images.to(device)).float().softmax(1).cpu()
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[(i, classifier.class_names[i], p) for i, p in zip(row_i.tolist(), row_p.tolist())]
            for row_i, row_p in zip(indices, values)]


# ---------------------------------------------------------------------------------------------- attention
def attention_probabilities(model: nn.Module, image: torch.Tensor, stage: int, block: int,
                            query: Tuple[float, float]) -> Dict[str, Any]:
    """Where one query location of a block's H-MHSA looks, per head.

    A forward hook captures the attention module's input; the probabilities are recomputed from the module's
    own layers (norm, qkv, grid_norm, q, kv, pool, ds_norm), the way its forward computes them.

    image: one transformed image (C, H, W); query: (x, y) pixel of that image.
    Returns ``query`` (row, column of its token on the stage's ``map_size`` grid); ``local`` (heads, cell rows,
    cell cols) and ``cell`` (top row, left column) for the grid step; ``global`` (heads, pooled rows, pooled
    cols) for the pooled step, or over the whole map if the stage has no grid; ``x`` and ``output``: the
    module's input and output.
    """
    attn = model.stages[stage].blocks[block].attn
    captured = {}
    handle = attn.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0], out=output))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(image[None].to(device))
    finally:
        handle.remove()
    x = captured['x']
    heads, head_dim = attn.num_heads, attn.head_dim
    height, width = x.shape[-2:]
    stride = model.feature_info[stage]['reduction']
    row, col = min(int(query[1]) // stride, height - 1), min(int(query[0]) // stride, width - 1)
    scale = head_dim ** -0.5

    def heads_of(t):  # (1, heads * head_dim, h, w) -> (heads, head_dim, h, w)
        return t.reshape(heads, head_dim, *t.shape[-2:])

    with torch.no_grad():
        qkv = attn.qkv(attn.norm(x))
        q, k, _ = (heads_of(t) for t in qkv.chunk(3, dim=1))
        query_vec = q[:, :, row, col]  # (heads, head_dim)
        result = dict(x=x, output=captured['out'], map_size=(height, width), query=(row, col))
        if attn.grid_norm is None:  # plain global self-attention over the whole map
            logits = torch.einsum('hd,hdyx->hyx', query_vec * scale, k)
            result['global'] = logits.flatten(1).softmax(-1).reshape(logits.shape).cpu()
            return result
        # local step: the keys of the query's grid cell (a ragged edge cell has only its valid tokens)
        size = attn.grid_size
        top, left = row // size * size, col // size * size
        cell_keys = k[:, :, top:top + size, left:left + size]
        logits = torch.einsum('hd,hdyx->hyx', query_vec * scale, cell_keys)
        result['local'] = logits.flatten(1).softmax(-1).reshape(logits.shape).cpu()
        result['cell'] = (top, left)
        # global step: queries from the locally attended map, keys from its pooled copy
        local = attn.grid_norm(x + grid_attention(qkv, size, heads))
        global_query = heads_of(attn.q(local))[:, :, row, col]
        pooled_keys = heads_of(attn.kv(attn.ds_norm(attn.pool(local))).chunk(2, dim=1)[0])
        logits = torch.einsum('hd,hdyx->hyx', global_query * scale, pooled_keys)
        result['global'] = logits.flatten(1).softmax(-1).reshape(logits.shape).cpu()
        result['pool'] = attn.pool.kernel_size
    return result


def attention_blocks(model: nn.Module) -> List[Tuple[int, int]]:
    """(stage, block) of every H-MHSA block of a HAT-Net model."""
    if not (hasattr(model, 'stages') and all(hasattr(s, 'blocks') for s in model.stages)) or not any(
            hasattr(b, 'attn') and hasattr(b.attn, 'grid_size') for s in model.stages for b in s.blocks):
        raise HatNetError('attention maps need a hat_net model')
    return [(i, j) for i, s in enumerate(model.stages) for j in range(len(s.blocks))]


def _token_map(result: Dict[str, Any], key: str) -> np.ndarray:
    """Head-averaged probabilities of one step on the stage's token grid (NaN outside the local cell)."""
    probs = result[key].mean(0).numpy()
    height, width = result['map_size']
    if key == 'local':
        top, left = result['cell']
        full = np.full((height, width), np.nan)
        full[top:top + probs.shape[0], left:left + probs.shape[1]] = probs
        return full
    if 'pool' in result:  # every token of a pooling window shows that pooled token's probability
        probs = probs.repeat(result['pool'], 0).repeat(result['pool'], 1)[:height, :width]
    return probs


def plot_attention(image: np.ndarray, result: Dict[str, Any], path, title: str = '') -> None:
    """Image with the query, then the grid (local) and pooled (global) attention averaged over heads."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img_h, img_w = image.shape[:2]
    height, width = result['map_size']
    sy, sx = img_h / height, img_w / width  # image pixels per token
    row, col = result['query']
    panels = [('query', None)]
    if 'local' in result:
        cell_h, cell_w = result['local'].shape[-2:]
        panels.append((f'local step: within its {cell_h}x{cell_w}-token grid cell', 'local'))
        pooled_h, pooled_w = result['global'].shape[-2:]
        panels.append((f'global step: to {pooled_h}x{pooled_w} pooled tokens', 'global'))
    else:
        panels.append((f'global attention to all {height}x{width} tokens', 'global'))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (label, key) in zip(axes, panels):
        ax.imshow(image)
        if key is not None:
            shown = ax.imshow(_token_map(result, key), cmap='inferno', alpha=0.6, extent=(0, img_w, img_h, 0),
                              interpolation='nearest')
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label='attention probability')
        if key == 'local':
            top, left = result['cell']
            ax.add_patch(Rectangle((left * sx, top * sy), cell_w * sx, cell_h * sy, fill=False,
                                   edgecolor='yellow', linewidth=1.5))
        ax.plot((col + 0.5) * sx, (row + 0.5) * sy, marker='x', color='cyan', markersize=10, markeredgewidth=2.5)
        ax.set_title(label, fontsize=9)
        ax.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
