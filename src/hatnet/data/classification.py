"""Classification datasets: an ImageFolder tree (``train/`` + ``val/``) or the embedded handwritten digits.

Unreadable images fail with their file name: a corrupt file stops the run with one clear error (rather
than being skipped silently), because a silently smaller dataset makes results irreproducible. Every file is
checked when the dataset is built (its header and what Pillow verifies without decoding), so a broken
validation image stops a run before its first step rather than after a whole epoch.
"""
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..errors import DatasetError
from .images import check_image_file, read_image

DIGITS = 'digits'


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 bundled 8 x 8 handwritten digits (no download), upscaled to ``size`` pixels as RGB.

    The split is fixed: a stratified 80 / 20 train / val split with seed 0 (1,437 / 360 images).
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str, size: int = 32, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ('train', 'val'):
            raise DatasetError(f"the digits dataset has the splits 'train' and 'val', not {split!r}")
        digits = load_digits()
        train_idx, val_idx = train_test_split(
            np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0)
        indices = train_idx if split == 'train' else val_idx
        pixels = (digits.images[indices] * (255 / 16)).round().astype(np.uint8)  # values 0..16 -> 0..255
        self.images = [Image.fromarray(p).resize((size, size), Image.BICUBIC).convert('RGB') for p in pixels]
        self.targets = digits.target[indices].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def image_folder(root, split: str, transform: Optional[Callable] = None) -> ImageFolder:
    """``root/split/<class>/<image>`` as a torchvision ImageFolder, with one clear error if it is not one."""
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise DatasetError(f'dataset folder {root} does not exist')
    if not split_dir.is_dir():
        raise DatasetError(f'dataset folder {root} has no {split}/ folder (expected {split}/<class>/<image>)')
    if not any(entry.is_dir() for entry in split_dir.iterdir()):
        raise DatasetError(f'{split_dir} has no class folders (expected {split}/<class>/<image>)')
    try:
        dataset = ImageFolder(str(split_dir), transform=transform, loader=partial(read_image, error=DatasetError))
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DatasetError(f'{split_dir}: {e}') from None
    with ThreadPoolExecutor(8) as pool:  # file reads: threads overlap their waits
        list(pool.map(lambda sample: check_image_file(sample[0], DatasetError), dataset.samples))
    return dataset


def classification_dataset(data: str, split: str, transform: Optional[Callable] = None,
                           img_size: int = 32) -> Dataset:
    """``data`` is ``'digits'`` or an ImageFolder root; the dataset has ``.classes`` (names, in label order).
    Every image file is checked here (see the module docstring)."""
    if data == DIGITS:
        return DigitsDataset(split, size=img_size, transform=transform)
    return image_folder(data, split, transform)


def check_same_classes(classes: List[str], other_classes: List[str], name: str, other_name: str) -> None:
    """Two class lists must be equal (same names, same order), or the labels would mean different classes."""
    if list(classes) == list(other_classes):
        return
    only = sorted(set(classes) - set(other_classes))
    only_other = sorted(set(other_classes) - set(classes))
    details = '; '.join(f'only in {where}: {", ".join(names[:5])}' + (' ...' if len(names) > 5 else '')
                        for where, names in ((name, only), (other_name, only_other)) if names)
    raise DatasetError(f'the classes of {name} and {other_name} differ ({details or "different order"})')
