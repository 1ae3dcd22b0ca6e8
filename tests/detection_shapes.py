"""A small COCO-format dataset of coloured shapes, written for the detection tests and benchmarks.

Every image has a noisy grey background and 1-3 (max_shapes) shapes (rectangle, triangle, disc: one colour family each)
annotated with their box and polygon; one annotation per split is stored as compressed RLE and one as
uncompressed RLE, and each split has one image without any shape.

    python tests/detection_shapes.py DIR [--train N] [--val N] [--size H W]
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [dict(id=3, name='rectangle'), dict(id=7, name='triangle'), dict(id=9, name='disc')]
COLOURS = {3: (220, 40, 40), 7: (40, 200, 40), 9: (40, 60, 230)}


def _shape_polygon(category_id, cx, cy, r, angle):
    if category_id == 3:
        corners = [(-1, -0.6), (1, -0.6), (1, 0.6), (-1, 0.6)]
    elif category_id == 7:
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:
        corners = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in corners]


def _write_split(root, split, count, size, radius, max_shapes, rng, first_ann_id):
    height, width = size
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(count):
        image_id = 1000 + index
        pixels = rng.normal(128, 20, (height, width, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        num_shapes = 0 if index == count - 1 else rng.integers(1, max_shapes + 1)
        for _ in range(num_shapes):
            category_id = int(rng.choice([c['id'] for c in CATEGORIES]))
            r = rng.uniform(*radius) * min(height, width)
            margin = 1.2 * r  # rectangle corners reach 1.17 r from the centre
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            polygon = _shape_polygon(category_id, cx, cy, r, rng.uniform(0, math.pi))
            colour = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[category_id])
            draw.polygon(polygon, fill=colour)
            flat = [round(float(v), 2) for point in polygon for v in point]
            xs, ys = flat[0::2], flat[1::2]
            rle = mask_utils.frPyObjects([flat], height, width)[0]
            segmentation = [flat]
            if ann_id == first_ann_id + 1:
                segmentation = dict(size=rle['size'], counts=rle['counts'].decode('ascii'))
            elif ann_id == first_ann_id + 2:
                decoded = mask_utils.decode(rle).flatten(order='F')  # column-major, as RLE counts run
                changes = np.flatnonzero(decoded[1:] != decoded[:-1]) + 1
                runs = np.diff(np.r_[0, changes, decoded.size]).tolist()
                segmentation = dict(size=[height, width], counts=([0] if decoded[0] else []) + runs)
            annotations.append(dict(
                id=ann_id, image_id=image_id, category_id=category_id, iscrowd=0,
                bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                area=float(mask_utils.area(rle)), segmentation=segmentation))
            ann_id += 1
        file_name = f'{image_id:06d}.png'
        image.save(root / split / file_name)
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
    (root / 'annotations').mkdir(exist_ok=True)
    data = dict(images=images, annotations=annotations, categories=CATEGORIES)
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(data))
    return ann_id


def write_shapes_dataset(root, train=32, val=8, size=(96, 128), radius=(0.12, 0.25), max_shapes=3, seed=0,
                         splits=('train2017', 'val2017')):
    """Write the dataset under ``root`` in the COCO 2017 layout; returns ``root``.

    ``radius``: range of the shapes' radii as fractions of the shorter image side.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, count in zip(splits, (train, val)):
        ann_id = _write_split(root, split, count, size, radius, max_shapes, rng, ann_id)
    return root


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root')
    parser.add_argument('--train', type=int, default=200)
    parser.add_argument('--val', type=int, default=50)
    parser.add_argument('--size', type=int, nargs=2, default=(160, 224), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    write_shapes_dataset(args.root, args.train, args.val, tuple(args.size), args.seed)
