"""COCO-format detection and instance-segmentation data.

Layout (COCO 2017; the split names are options)::

    DIR/train2017/*.jpg
    DIR/val2017/*.jpg
    DIR/annotations/instances_train2017.json
    DIR/annotations/instances_val2017.json

The annotation file is read with pycocotools after it has been checked as a whole, so a bad dataset fails
before training starts with one message naming the file, image or annotation:

* errors: a json that does not parse or lacks images/annotations/categories; ids that are not integers, or
  duplicated; image sizes and boxes that are not finite numbers; an annotation whose image or category is not
  listed; a box reaching more than one pixel outside its image; a file name that leads outside the image
  folder (absolute, or with ``..``: the message does not say whether anything is there); an image file that is
  missing, unreadable or of another size than the json says (the size as shown, after the EXIF orientation
  that :mod:`hatnet.data.images` applies); a malformed segmentation (when masks are needed); train and val
  splits with different categories.
* skipped and counted: boxes of zero or negative width or height (COCO itself has a few), crowd regions in
  training (torchvision's detectors cannot use "ignore" regions; evaluation still sees them), and in
  training, images left without annotations (they teach RetinaNet / Mask R-CNN nothing but cost time).

Category ids are mapped to contiguous labels 1..K (0 is the background, as torchvision expects).
Images, boxes and masks are augmented together with torchvision transforms v2 on tv_tensors.
"""
import contextlib
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import DatasetError
from ..fileio import resolve_inside
from .images import image_size, read_image_tensor

__all__ = ['CocoDetection', 'check_same_categories', 'collate', 'detection_transforms', 'load_coco_json',
           'split_paths', 'write_shapes_dataset']

# a box may reach this far past the image border (annotation tools round); it is clipped
BORDER_TOLERANCE = 1.0


def split_paths(root, split: str) -> Tuple[Path, Path]:
    """(image folder, annotation json) of one split in the COCO 2017 layout."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f'dataset folder not found: {root}')
    images, annotations = root / split, root / 'annotations' / f'instances_{split}.json'
    if not images.is_dir():
        raise DatasetError(f'image folder of split {split!r} not found: {images}')
    if not annotations.is_file():
        raise DatasetError(f'annotation file of split {split!r} not found: {annotations}')
    return images, annotations


def _require(entry: Any, keys: Sequence[str], what: str, path: Path, integers: Sequence[str] = ()) -> None:
    """``entry`` is an object with ``keys``, of which ``integers`` hold integers (ids, sizes)."""
    if not isinstance(entry, dict):
        raise DatasetError(f'{path}: {what} is not an object')
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f'{path}: {what} has no {", ".join(missing)}')
    for key in integers:
        if isinstance(entry[key], bool) or not isinstance(entry[key], int):
            raise DatasetError(f'{path}: {what} has {key} {entry[key]!r}; expected an integer')


def _unique_ids(entries: List[dict], what: str, path: Path) -> None:
    counts = Counter(e['id'] for e in entries)
    duplicated = [i for i, n in counts.items() if n > 1]
    if duplicated:
        raise DatasetError(f'{path}: {what} id {duplicated[0]} is used {counts[duplicated[0]]} times')


def _check_segmentation(ann: dict, image: dict, path: Path) -> None:
    what = f'annotation {ann["id"]} (image {image["file_name"]})'
    segm = ann.get('segmentation')
    if isinstance(segm, list):
        if not segm:
            raise DatasetError(f'{path}: {what} has an empty segmentation')
        for polygon in segm:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) for v in polygon)):
                raise DatasetError(f'{path}: {what} has a malformed polygon (need x, y pairs, at least 3 points)')
    elif isinstance(segm, dict):
        if 'counts' not in segm or list(segm.get('size', [])) != [image['height'], image['width']]:
            raise DatasetError(f'{path}: {what} has an RLE mask without counts or whose size is not '
                               f'[{image["height"]}, {image["width"]}]')
    else:
        raise DatasetError(f'{path}: {what} has no segmentation (polygons or RLE); Mask R-CNN needs masks')


def load_coco_json(images_dir: Path, path: Path, with_masks: bool = False) -> Tuple[COCO, Counter]:
    """Read and check a COCO instances json; returns the pycocotools index and counts of skipped boxes.

    Images are checked (exists, readable, size as listed) by reading their headers only.
    """
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f'{path} is not valid JSON: {e}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f'cannot read {path}: {e}') from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ('images', 'annotations',
                                                                                       'categories')):
        raise DatasetError(f'{path} is not a COCO instances file: it needs lists "images", "annotations" '
                           f'and "categories"')
    if not data['categories']:
        raise DatasetError(f'{path}: the category list is empty')
    if not data['images']:
        raise DatasetError(f'{path}: the image list is empty')
    for i, cat in enumerate(data['categories']):
        _require(cat, ('id', 'name'), f'category #{i}', path, integers=('id',))
    for i, img in enumerate(data['images']):
        _require(img, ('id', 'file_name', 'width', 'height'), f'image #{i}', path, integers=('id', 'width', 'height'))
        if img['width'] < 1 or img['height'] < 1:
            raise DatasetError(f'{path}: image #{i} has size {img["width"]}x{img["height"]}')
    for i, ann in enumerate(data['annotations']):
        _require(ann, ('id', 'image_id', 'category_id', 'bbox'), f'annotation #{i}', path,
                 integers=('id', 'image_id', 'category_id'))
    _unique_ids(data['categories'], 'category', path)
    _unique_ids(data['images'], 'image', path)
    _unique_ids(data['annotations'], 'annotation', path)

    images = {img['id']: img for img in data['images']}
    category_ids = {cat['id'] for cat in data['categories']}
    skipped = Counter()
    for ann in data['annotations']:
        what = f'annotation {ann["id"]}'
        image = images.get(ann['image_id'])
        if image is None:
            raise DatasetError(f'{path}: {what} refers to image id {ann["image_id"]}, which is not in the image list')
        what += f' (image {image["file_name"]})'
        if ann['category_id'] not in category_ids:
            raise DatasetError(f'{path}: {what} has category id {ann["category_id"]}, which is not in the '
                               f'category list {sorted(category_ids)}')
        box = ann['bbox']
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                and math.isfinite(v) for v in box)):
            raise DatasetError(f'{path}: {what} has bbox {box!r}; expected [x, y, width, height]')
        x, y, w, h = box
        # COCOeval needs both; fill them in the way COCO defines them when a file leaves them out
        ann.setdefault('iscrowd', 0)
        ann.setdefault('area', max(w, 0) * max(h, 0))
        if w <= 0 or h <= 0:
            skipped['boxes with non-positive size'] += 1
            continue
        if (x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE or x + w > image['width'] + BORDER_TOLERANCE
                or y + h > image['height'] + BORDER_TOLERANCE):
            raise DatasetError(f'{path}: {what} has bbox [x, y, w, h] = {box}, outside the '
                               f'{image["width"]}x{image["height"]} image')
        if with_masks and not ann['iscrowd']:
            _check_segmentation(ann, image, path)
    _check_image_files(images_dir, data['images'], path)

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, skipped


def image_path(images_dir: Path, image: dict, annotation_file: Path) -> Path:
    """The file of an image entry: its ``file_name`` inside ``images_dir``, never outside."""
    return resolve_inside(images_dir, image['file_name'], f'{annotation_file}: image {image["id"]}')


def _check_image_files(images_dir: Path, images: List[dict], annotation_file: Path) -> None:
    for img in images:
        path = image_path(images_dir, img, annotation_file)
        if not path.is_file():
            raise DatasetError(f'image file not found: {path} (listed in the annotation file)')
        size = image_size(path, DatasetError)
        if size != (img['width'], img['height']):
            raise DatasetError(f'image {path} is {size[0]}x{size[1]}, but the annotation file says '
                               f'{img["width"]}x{img["height"]}')


def detection_transforms(train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333,
                         hflip: float = 0.5) -> v2.Transform:
    """Joint image/box/mask transforms (torchvision v2).

    Training: resize keeping the aspect ratio so that the shorter side is one of ``min_sizes`` (picked at
    random: multi-scale training when there are several) and the longer side at most ``max_size``, then a
    horizontal flip; boxes that became degenerate are dropped. Evaluation: no resize here, the model
    resizes to its own min_size/max_size and maps its results back to the original image.
    """
    steps: List[v2.Transform] = [v2.ToImage()]
    if train:
        steps += [v2.RandomShortestSize(list(min_sizes), max_size), v2.RandomHorizontalFlip(hflip),
                  v2.SanitizeBoundingBoxes()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class CocoDetection(Dataset):
    """A COCO-format split: (image, target) pairs for torchvision's detectors.

    ``target`` has ``boxes`` (tv_tensors.BoundingBoxes, XYXY pixels), ``labels`` (1..K), ``image_id`` and,
    with ``with_masks``, ``masks`` (tv_tensors.Mask, one uint8 plane per instance).

    Args:
        root: dataset folder in the COCO 2017 layout.
        split: split name ('train2017', 'val2017', ...).
        transforms: v2 transform applied to (image, target), e.g. :func:`detection_transforms`; without
            one, images are uint8.
        with_masks: decode instance masks (polygons or RLE) for Mask R-CNN.
        train: training set: skip crowd regions and images without annotations.
    """

    def __init__(self, root, split: str, transforms: Optional[v2.Transform] = None, with_masks: bool = False,
                 train: bool = False):
        self.images_dir, self.annotation_file = split_paths(root, split)
        self.coco, self.skipped = load_coco_json(self.images_dir, self.annotation_file, with_masks)
        self.transforms = transforms
        self.with_masks = with_masks
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[i]['name'] for i in self.category_ids]
        self.label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids, start=1)}

        self.image_ids = sorted(self.coco.getImgIds())
        if train:
            self.skipped['crowd regions'] = sum(a['iscrowd'] for a in self.coco.dataset['annotations'])
            kept = [i for i in self.image_ids if self._annotations(i)]
            self.skipped['images without annotations'] = len(self.image_ids) - len(kept)
            self.image_ids = kept
            if not kept:
                raise DatasetError(f'{self.annotation_file}: no image has a usable annotation')
        self.skipped = +self.skipped  # drop zero counts

    @property
    def num_classes(self) -> int:
        """Number of classes including the background, as torchvision's detectors count them."""
        return len(self.category_ids) + 1

    def _annotations(self, image_id: int) -> List[dict]:
        """The annotations the detector learns from: no crowd regions, no degenerate boxes."""
        return [a for a in self.coco.imgToAnns[image_id] if a['bbox'][2] > 0 and a['bbox'][3] > 0 and not a['iscrowd']]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> tv_tensors.Image:
        """The image as a uint8 (3, H, W) tv_tensor."""
        image = self.coco.imgs[self.image_ids[index]]
        return read_image_tensor(image_path(self.images_dir, image, self.annotation_file), DatasetError)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self.load_image(index)
        anns = self._annotations(image_id)
        canvas = (info['height'], info['width'])
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = dict(
            # clamped: boxes may reach BORDER_TOLERANCE past the border
            boxes=v2.functional.clamp_bounding_boxes(
                tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=canvas)),
            labels=torch.tensor([self.label_of[a['category_id']] for a in anns], dtype=torch.int64),
            image_id=image_id,
        )
        if self.with_masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *canvas), np.uint8)
            target['masks'] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def check_same_categories(train: CocoDetection, val: CocoDetection) -> None:
    """Raise if two splits do not list the same categories (ids and names)."""
    def cats(ds):
        return [(c, ds.coco.cats[c]['name']) for c in ds.category_ids]
    if cats(train) != cats(val):
        raise DatasetError(f'{train.annotation_file} and {val.annotation_file} list different categories')


def collate(batch):
    """Lists of images and targets (torchvision's detectors take images of different sizes)."""
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------------------------
# a generated dataset to try detection offline


def write_shapes_dataset(root, num_train: int = 300, num_val: int = 60, size: Tuple[int, int] = (96, 128),
                         seed: int = 0, max_shapes: int = 3, splits: Tuple[str, str] = ('train2017', 'val2017')
                         ) -> Path:
    """Write a COCO-2017-layout instance dataset of :func:`hatnet.data.shapes.draw_scene` scenes under ``root``.

    Circles, squares and triangles (category ids 1..3), each in a random colour, size and rotation on a random
    background, so that only geometry tells the classes apart; shapes may overlap. Image sides are drawn from
    ``size`` (min, max). Each instance is annotated with the box around its visible part, that part as a
    compressed RLE mask (occlusion can split it, which a polygon list would have to approximate), its area
    (pixels of the mask) and ``iscrowd: 0``. Image ids are unique across the splits. Sets of one seed share
    their validation images (:func:`hatnet.data.shapes.split_scenes`; their ids follow the training images').
    """
    from .shapes import SHAPE_CLASSES, split_scenes

    root = Path(root)
    categories = [dict(id=i, name=name, supercategory='shape') for i, name in enumerate(SHAPE_CLASSES, start=1)]
    image_id = ann_id = 0
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for index, (split, count) in enumerate(zip(splits, (num_train, num_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for scene in split_scenes(seed, index, count, size, max_shapes):
            image_id += 1
            height, width = scene.image.shape[:2]
            file_name = f'{image_id:06d}.png'
            Image.fromarray(scene.image).save(root / split / file_name)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
            for class_id, mask in scene.instances:
                if not mask.any():
                    continue
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                ann_id += 1
                annotations.append(dict(
                    id=ann_id, image_id=image_id, category_id=int(class_id), iscrowd=0,
                    bbox=[float(v) for v in mask_utils.toBbox(rle)], area=float(mask_utils.area(rle)),
                    segmentation=dict(size=[height, width], counts=rle['counts'].decode('ascii'))))
        data = dict(info=dict(description=f'hatnet det shapes, seed {seed}'), images=images,
                    annotations=annotations, categories=categories)
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(data))
    return root
