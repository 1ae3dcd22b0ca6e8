"""Semantic segmentation datasets: the ADE20K layout and a generic folders layout.

ADE20K (``ADEChallengeData2016``)::

    DIR/images/{training,validation}/*.jpg
    DIR/annotations/{training,validation}/*.png     0 = "other" (ignored), 1..150 = classes 0..149

Folders::

    DIR/images/{train,val}/*.{jpg,png,...}
    DIR/masks/{train,val}/*.png                     class indices 0..N-1, the ignore index elsewhere
    DIR/classes.yaml (or .json)                     optional: {classes: [...], ignore_index: 255,
                                                    palette: [[r, g, b], ...]} or a plain list of names

Masks are single-channel PNGs of class indices (mode L, P or 16-bit), read as stored; images are read by
:mod:`hatnet.data.images` (EXIF orientation applied). Every split is checked once, before anything is trained
or written: each image is readable and has a mask of the same size (as shown), each mask an image, no split
is empty, and no mask holds a label outside the classes other than the ignore index. The classes are the
class file's (or ``num_classes``); without either they are inferred from the labels, which must then be
0..N-1 with each one occurring, so that one stray value (say 200) is reported with its counts instead of
making a model of 201 classes. Each problem is one :class:`DatasetError` naming the files.

Augmentation is joint on image and mask with torchvision transforms v2 (masks are ``tv_tensors.Mask``, so
geometric transforms use nearest-neighbour for them and photometric ones leave them alone), following the
mmsegmentation ADE20K pipeline that PVT and HAT-Net use.
"""
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import DatasetError
from . import shapes
from .images import image_size, read_image_tensor

__all__ = [
    'ADE20K_CLASSES', 'LAYOUTS', 'MAX_SIDE_RATIO', 'SHAPE_CLASSES', 'PhotoMetricDistortion', 'RandomCropCatMaxRatio',
    'SegmentationData', 'SegmentationDataset', 'colorize', 'eval_transform', 'find_samples', 'get_layout',
    'load_data', 'make_palette', 'train_transform', 'write_shapes_dataset',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
MAX_SIDE_RATIO = 4  # single-scale testing: the longer side is at most this times the test scale
MASK_MODES = ('L', 'P', 'I;16', 'I')
CLASS_FILES = ('classes.yaml', 'classes.yml', 'classes.json')


@dataclass(frozen=True)
class Layout:
    images: str                 # folder of the images, below the dataset root
    masks: str                  # folder of the masks
    splits: Tuple[str, str]     # (train, validation) sub-folder names
    reduce_zero_label: bool     # mask value 0 means "unlabelled": ignored, the other values shift down by one


LAYOUTS = {
    'ade20k': Layout('images', 'annotations', ('training', 'validation'), reduce_zero_label=True),
    'folders': Layout('images', 'masks', ('train', 'val'), reduce_zero_label=False),
}

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)


@dataclass
class SegmentationData:
    """A checked dataset on disk: its samples per split and its classes."""
    root: Path
    layout: str
    class_names: List[str]
    ignore_index: int
    reduce_zero_label: bool
    palette: List[Tuple[int, int, int]]
    samples: Dict[str, List[Tuple[Path, Path]]] = field(default_factory=dict)   # split -> (image, mask) pairs

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _files(folder: Path, extensions: Sequence[str]) -> Dict[str, Path]:
    """stem -> file for the files in ``folder`` with one of ``extensions``; a stem may occur once."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith('.'):
            if path.stem in files:
                raise DatasetError(f'two files with the stem {path.stem!r} in {folder}: '
                                   f'{files[path.stem].name}, {path.name}')
            files[path.stem] = path
    return files


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise DatasetError(f'unknown dataset layout {name!r}; choose one of {sorted(LAYOUTS)}')
    return LAYOUTS[name]


def find_samples(root: Path, layout: str, split: str) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs of one split, matched by file stem; every image needs a mask and vice versa."""
    spec = get_layout(layout)
    image_dir, mask_dir = root / spec.images / split, root / spec.masks / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f'missing folder {folder} (expected the {layout} layout, see `hatnet seg train --help`)')
    images, masks = _files(image_dir, IMAGE_EXTENSIONS), _files(mask_dir, ('.png',))
    if not images:
        raise DatasetError(f'empty split: no images in {image_dir}')
    for stem, image in images.items():
        if stem not in masks:
            raise DatasetError(f'image {image} has no mask (expected {mask_dir / (stem + ".png")})')
    for stem, mask in masks.items():
        if stem not in images:
            raise DatasetError(f'mask {mask} has no image in {image_dir}')
    return [(images[stem], masks[stem]) for stem in images]


def _read_mask(path: Path) -> np.ndarray:
    """The stored values of a mask, exactly (no conversion, no EXIF orientation)."""
    try:
        opened = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f'cannot read mask {path} ({e})') from None
    with opened as mask:
        if mask.mode not in MASK_MODES:
            raise DatasetError(f'mask {path} is a {mask.mode} image; masks must be single-channel PNGs of class '
                               f'indices (mode L, P or 16-bit)')
        try:
            return np.asarray(mask)
        except OSError as e:
            raise DatasetError(f'cannot read mask {path} ({e})') from None


def map_labels(values, ignore_index: int, reduce_zero_label: bool):
    """Stored mask values -> class indices (``ignore_index`` stays, 0 becomes it with reduce_zero_label)."""
    if not reduce_zero_label:
        return values
    return np.where((values == 0) | (values == ignore_index), ignore_index, values - 1)


def _check_pair(image: Path, mask: Path, ignore_index: int, reduce_zero_label: bool) -> Dict[int, int]:
    """Check that ``mask`` fits ``image``; return its pixel count per class index (ignored pixels left out)."""
    width, height = image_size(image, DatasetError)
    labels = _read_mask(mask)
    if labels.shape != (height, width):
        raise DatasetError(f'mask {mask} is {labels.shape[1]}x{labels.shape[0]} but its image {image} is '
                           f'{width}x{height} (width x height)')
    if labels.dtype.kind == 'i' and labels.min() < 0:
        raise DatasetError(f'mask {mask} contains negative values; masks hold class indices')
    counts = np.bincount(labels.ravel())
    stored = np.flatnonzero(counts)
    classes = map_labels(stored, ignore_index, reduce_zero_label)
    return {int(c): int(n) for c, n in zip(classes, counts[stored]) if c != ignore_index}


def _label_report(usage: Dict[int, Tuple[int, int, Path]], labels: Sequence[int], reduce_zero_label: bool) -> str:
    """'label 200 in 1 mask (1 pixel, e.g. PATH); ...' for the first few ``labels`` (as stored in the files)."""
    parts = []
    for label in labels[:3]:
        masks, pixels, example = usage[label]
        parts.append(f'label {label + 1 if reduce_zero_label else label} in {masks} mask{"s" * (masks > 1)} '
                     f'({pixels} pixel{"s" * (pixels > 1)}, e.g. {example})')
    return '; '.join(parts) + (f'; {len(labels) - 3} more labels' if len(labels) > 3 else '')


def _check_labels(usage: Dict[int, Tuple[int, int, Path]], num_classes: Optional[int], root: Path, ignore_index: int,
                  reduce_zero_label: bool) -> int:
    """The number of classes: ``num_classes`` (declared) if given, else inferred from the labels in use, which must
    then be 0..N-1 with each one occurring. Labels outside the classes are one error with their counts."""
    if num_classes is not None:
        outside = sorted(label for label in usage if label >= num_classes)
        if outside:
            valid = f'1..{num_classes} (0 = unlabelled)' if reduce_zero_label else f'0..{num_classes - 1}'
            raise DatasetError(f'masks below {root} hold labels outside the {num_classes} classes: '
                               f'{_label_report(usage, outside, reduce_zero_label)}; valid values are {valid} and '
                               f'the ignore index {ignore_index}')
        return num_classes
    if not usage:  # every mask is unlabelled
        raise DatasetError(f'no labelled pixels in any mask below {root}')
    inferred = max(usage) + 1
    unused = [label for label in range(inferred) if label not in usage]
    if unused:
        rarest = sorted(usage, key=lambda label: usage[label][1])  # the likely stray values first
        raise DatasetError(
            f'the mask labels below {root} are not 0..N-1: {len(unused)} of the values up to the largest, '
            f'{inferred - 1 + reduce_zero_label}, never occur; the rarest are '
            f'{_label_report(usage, rarest, reduce_zero_label)}. List the classes in classes.yaml (or give '
            f'--num-classes): labels outside them are then reported as errors')
    return inferred


def _read_class_file(root: Path) -> Tuple[Optional[List[str]], Optional[int], Optional[list]]:
    """(names, ignore index, palette) from DIR/classes.{yaml,json}; None for what it does not give."""
    path = next((root / name for name in CLASS_FILES if (root / name).is_file()), None)
    if path is None:
        return None, None, None
    try:
        text = path.read_text()
        spec = json.loads(text) if path.suffix == '.json' else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise DatasetError(f'cannot read the class file {path} ({str(e).splitlines()[0]})') from None
    if isinstance(spec, list):
        spec = dict(classes=spec)
    names = spec.get('classes') if isinstance(spec, dict) else None
    if not isinstance(names, list) or not names:
        raise DatasetError(f'{path} must hold a list of class names, or a mapping with a "classes" list')
    ignore_index, palette = spec.get('ignore_index'), spec.get('palette')
    if ignore_index is not None and (not isinstance(ignore_index, int) or 0 <= ignore_index < len(names)):
        raise DatasetError(f'{path}: ignore_index must be an integer outside 0..{len(names) - 1}, got {ignore_index!r}')
    if palette is not None and not (isinstance(palette, list) and len(palette) >= len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) for v in c) for c in palette)):
        raise DatasetError(f'{path}: palette must give one [r, g, b] colour per class')
    return [str(n) for n in names], ignore_index, [tuple(int(v) for v in c) for c in palette or []] or None


def make_palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """Distinct colours for class indices (the PASCAL VOC colour map, extended to any number of classes)."""
    palette = []
    for index in range(num_classes):
        r = g = b = 0
        for shift in range(7, -1, -1):
            if not index:
                break
            r |= (index & 1) << shift
            g |= ((index >> 1) & 1) << shift
            b |= ((index >> 2) & 1) << shift
            index >>= 3
        palette.append((r, g, b))
    return palette


def load_data(
        root,
        layout: str = 'ade20k',
        splits: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        workers: int = 4,
) -> SegmentationData:
    """Find and check the given splits (default: train and validation) of a dataset.

    The number of classes is ``num_classes`` if given, else the class file's, else inferred from the labels
    (which must then be 0..N-1, each occurring); ADE20K data with 150 classes gets ADE20K's class names.
    """
    root = Path(root)
    spec = get_layout(layout)
    if not root.is_dir():
        raise DatasetError(f'dataset folder not found: {root}')
    if num_classes is not None and num_classes < 1:
        raise DatasetError(f'the number of classes must be at least 1, got {num_classes}')
    names, ignore_index, palette = _read_class_file(root) if layout == 'folders' else (None, None, None)
    ignore_index = 255 if ignore_index is None else ignore_index
    samples = {split: find_samples(root, layout, split) for split in (splits or spec.splits)}

    pairs = [pair for split_samples in samples.values() for pair in split_samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        counts = list(pool.map(lambda pair: _check_pair(*pair, ignore_index, spec.reduce_zero_label), pairs))
    usage: Dict[int, Tuple[int, int, Path]] = {}  # class index -> (masks, pixels, first mask) holding it
    for (_, mask), mask_counts in zip(pairs, counts):
        for label, pixels in mask_counts.items():
            masks, total, example = usage.get(label, (0, 0, mask))
            usage[label] = (masks + 1, total + pixels, example)

    if names is not None and num_classes is not None and num_classes != len(names):
        raise DatasetError(f'the class file lists {len(names)} classes but {num_classes} were asked for')
    num_classes = _check_labels(usage, num_classes or (len(names) if names else None), root, ignore_index,
                                spec.reduce_zero_label)
    if names is None:
        names = list(ADE20K_CLASSES) if layout == 'ade20k' and num_classes == len(ADE20K_CLASSES) else \
            [f'class_{i}' for i in range(num_classes)]
    return SegmentationData(root, layout, names, ignore_index, spec.reduce_zero_label,
                            palette or make_palette(num_classes), samples)


class SegmentationDataset(Dataset):
    """(image, mask) pairs as (float (3, H, W) normalised image, int64 (H, W) class-index mask).

    With ``joint=True`` (training) the transform sees image and mask together; otherwise it sees only the
    image and the mask keeps its original size, so that metrics are computed at full resolution.
    """

    def __init__(self, samples: List[Tuple[Path, Path]], transform, ignore_index: int = 255,
                 reduce_zero_label: bool = False, joint: bool = True):
        self.samples = samples
        self.transform = transform
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.joint = joint

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        image = read_image_tensor(image_path, DatasetError)
        labels = map_labels(_read_mask(mask_path).astype(np.int64), self.ignore_index, self.reduce_zero_label)
        mask = tv_tensors.Mask(torch.from_numpy(labels))
        if self.joint:
            image, mask = self.transform(image, mask)
        else:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def collate(batch):
    """Lists of images and masks: evaluation images keep their own sizes (training stacks them)."""
    images, masks = zip(*batch)
    return list(images), list(masks)


class RandomCropCatMaxRatio(v2.RandomCrop):
    """Random crop (padded where the image is smaller) that re-draws its window, up to ``tries`` times,
    while a single class covers more than ``cat_max_ratio`` of the labelled pixels (mmsegmentation's rule)."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = 255,
                 image_fill: Sequence[int] = (0, 0, 0), tries: int = 10):
        super().__init__(size, pad_if_needed=True,
                         fill={tv_tensors.Image: tuple(image_fill), tv_tensors.Mask: ignore_index})
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.tries = tries

    def make_params(self, flat_inputs: List) -> Dict:
        params = super().make_params(flat_inputs)
        if self.cat_max_ratio >= 1.:
            return params
        mask = next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))
        for _ in range(self.tries):
            labels = self.transform(mask, params)
            counts = torch.bincount(labels[labels != self.ignore_index].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
            params = super().make_params(flat_inputs)
        return params


class PhotoMetricDistortion(v2.RandomPhotometricDistort):
    """mmsegmentation's PhotoMetricDistortion: brightness, contrast (before or after the rest), saturation and
    hue (+-18 of OpenCV's 180 hue steps), each with probability 0.5. torchvision's version also shuffles the
    colour channels, which mmsegmentation does not do (and which would hide classes told apart by colour)."""

    def __init__(self):
        super().__init__(hue=(-0.1, 0.1))

    def make_params(self, flat_inputs: List) -> Dict:
        return dict(super().make_params(flat_inputs), channel_permutation=None)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> List:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True), v2.Normalize(mean, std)]


def train_transform(
        crop_size: int,
        short_side: int,
        mean: Sequence[float],
        std: Sequence[float],
        ratio_range: Tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
) -> v2.Compose:
    """mmsegmentation's ADE20K training pipeline (as in PVT / HAT-Net) with torchvision transforms v2:
    short side resized to ``short_side`` x U(ratio_range), random crop with the cat-max-ratio rule (padding
    with the mean colour, which is 0 after normalisation, and the ignore index), horizontal flip,
    photometric distortion."""
    mean_colour = [round(255 * m) for m in mean]
    return v2.Compose([
        v2.RandomResize(round(short_side * ratio_range[0]), round(short_side * ratio_range[1]) + 1, antialias=True),
        RandomCropCatMaxRatio(crop_size, cat_max_ratio, ignore_index, image_fill=mean_colour),
        v2.RandomHorizontalFlip(),
        PhotoMetricDistortion(),
        *_normalize(mean, std),
    ])


def eval_transform(short_side: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Single-scale testing: short side to ``short_side`` (the long side at most 4x that), normalised."""
    return v2.Compose([v2.Resize(short_side, max_size=MAX_SIDE_RATIO * short_side, antialias=True),
                       *_normalize(mean, std)])


def colorize(mask: np.ndarray, palette: Sequence[Tuple[int, int, int]]) -> Image.Image:
    """A class-index mask as a palette PNG image (an RGB one for more than 256 classes)."""
    if len(palette) <= 256:
        image = Image.fromarray(mask.astype(np.uint8))
        image.putpalette([v for colour in palette for v in colour])  # L -> P: the pixels stay class indices
        return image
    return Image.fromarray(np.asarray(palette, dtype=np.uint8)[mask])


# the classes of the shapes datasets: mask value 0 is the background, 1..3 the shapes of hatnet.data.shapes
SHAPE_CLASSES = ('background',) + shapes.SHAPE_CLASSES


def write_shapes_dataset(root, layout: str = 'folders', num_train: int = 300, num_val: int = 60,
                         size: Tuple[int, int] = (96, 128), seed: int = 0, max_shapes: int = 3) -> Path:
    """Write a synthetic segmentation dataset of :func:`hatnet.data.shapes.draw_scene` scenes (circles, squares
    and triangles in random colours on random backgrounds: only their geometry tells the classes apart; 4
    classes with 'background') in one of the :data:`LAYOUTS`. Image sides are drawn from ``size`` (min, max).
    Blended borders between regions are unlabelled (0 in the ADE20K layout, 255 in the folders one). Sets of one
    seed share their validation images (:func:`hatnet.data.shapes.split_scenes`)."""
    root = Path(root)
    spec = get_layout(layout)
    for index, (split, count) in enumerate(zip(spec.splits, (num_train, num_val))):
        (root / spec.images / split).mkdir(parents=True, exist_ok=True)
        (root / spec.masks / split).mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(shapes.split_scenes(seed, index, count, size, max_shapes)):
            labels = scene.labels(ignore_value=255)
            stored = np.where(labels == 255, 0, labels + 1) if spec.reduce_zero_label else labels
            Image.fromarray(scene.image).save(
                root / spec.images / split / f'{i:05d}.{"jpg" if layout == "ade20k" else "png"}', quality=95)
            Image.fromarray(stored.astype(np.uint8)).save(root / spec.masks / split / f'{i:05d}.png')
    if layout == 'folders':
        (root / 'classes.yaml').write_text(yaml.safe_dump(dict(classes=list(SHAPE_CLASSES), ignore_index=255)))
    return root
