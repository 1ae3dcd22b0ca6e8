"""The detection tests' dataset: ``hatnet det shapes`` data (hatnet.data.detection.write_shapes_dataset) made to
exercise every part of the COCO format the loader reads.

On top of the generated scenes (circles, squares, triangles in random colours, RLE masks): the category ids
become 3, 7, 9 (not 1..K, so the mapping to labels and back is tested), in each split one annotation is stored
as a polygon (its box's four corners, area recomputed) and one as uncompressed RLE, and each split gets one
image without any shape (the last image of the split). Image ids are 1000, 1001, ... in each split.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from hatnet.data.detection import write_shapes_dataset as write_generated
from hatnet.data.shapes import SHAPE_CLASSES

CATEGORY_IDS = {1: 3, 2: 7, 3: 9}
CATEGORIES = [dict(id=CATEGORY_IDS[i], name=name) for i, name in enumerate(SHAPE_CLASSES, start=1)]


def write_test_dataset(root, train=6, val=3, size=(96, 96), seed=0, max_shapes=3):
    # the last image of each split is the empty one: train - 1 and val - 1 scenes
    root = write_generated(root, train - 1, val - 1, size=size, seed=seed, max_shapes=max_shapes)
    rng = np.random.default_rng(seed + 1000)
    for split in ('train2017', 'val2017'):
        path = root / 'annotations' / f'instances_{split}.json'
        data = json.loads(path.read_text())
        # ids 1000, 1001, ... in each split, files named after them
        new_ids = {image['id']: 1000 + index for index, image in enumerate(data['images'])}
        for image in data['images']:
            image['id'] = new_ids[image['id']]
            file_name = f'{image["id"]:06d}.png'
            (root / split / image['file_name']).rename(root / split / file_name)
            image['file_name'] = file_name
        for ann in data['annotations']:
            ann['image_id'] = new_ids[ann['image_id']]
            ann['category_id'] = CATEGORY_IDS[ann['category_id']]
        for category in data['categories']:
            category['id'] = CATEGORY_IDS[category['id']]
        anns = data['annotations']
        polygon_ann = anns[1] if len(anns) > 2 else anns[0] if anns else None
        uncompressed_ann = anns[2] if len(anns) > 2 else anns[-1] if len(anns) > 1 else None
        if polygon_ann is not None:
            image = next(i for i in data['images'] if i['id'] == polygon_ann['image_id'])
            x, y, w, h = polygon_ann['bbox']
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            polygon_ann['segmentation'] = [polygon]
            polygon_ann['area'] = float(mask_utils.area(mask_utils.frPyObjects([polygon], image['height'],
                                                                              image['width'])[0]))
        if uncompressed_ann is not None:
            rle = uncompressed_ann['segmentation']
            decoded = mask_utils.decode(dict(size=rle['size'], counts=rle['counts'].encode())).flatten(order='F')
            changes = np.flatnonzero(decoded[1:] != decoded[:-1]) + 1  # RLE counts run down the columns
            runs = np.diff(np.r_[0, changes, decoded.size]).tolist()
            uncompressed_ann['segmentation'] = dict(size=rle['size'], counts=([0] if decoded[0] else []) + runs)
        height, width = size[0], size[-1]
        image_id = 1000 + len(data['images'])
        file_name = f'{image_id:06d}.png'
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / split / file_name)
        data['images'].append(dict(id=image_id, file_name=file_name, width=width, height=height))
        path.write_text(json.dumps(data))
    return Path(root)


write_shapes_dataset = write_test_dataset  # the name the other test modules import
