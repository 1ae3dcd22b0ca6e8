"""COCO-format detection data: loading, masks, joint transforms, and one clear error per kind of bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from detection_shapes import write_test_dataset
from hatnet.data.detection import CocoDetection, check_same_categories, detection_transforms
from hatnet.errors import DatasetError


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_test_dataset(tmp_path_factory.mktemp('shapes'), train=6, val=3)


@pytest.fixture
def dataset_copy(shapes, tmp_path):
    """A fresh copy of the dataset and a function that edits its train json."""
    root = tmp_path / 'coco'
    shutil.copytree(shapes, root)
    path = root / 'annotations' / 'instances_train2017.json'

    def edit(change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return data
    return root, edit


def test_targets_match_annotations(shapes):
    ds = CocoDetection(shapes, 'train2017', detection_transforms(train=False), with_masks=True)
    assert ds.category_ids == [3, 7, 9] and ds.class_names == ['circle', 'square', 'triangle']
    assert ds.num_classes == 4
    kinds = set()
    for index in range(len(ds)):
        image, target = ds[index]
        anns = ds.coco.imgToAnns[ds.image_ids[index]]
        kinds.update(type(a['segmentation']).__name__ + str(type(a['segmentation']).__name__ == 'dict'
                                                          and type(a['segmentation']['counts']).__name__)
                     for a in anns)
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert target['labels'].tolist() == [ds.label_of[a['category_id']] for a in anns]
        for box, mask, ann in zip(target['boxes'], target['masks'], anns):
            x, y, w, h = ann['bbox']
            assert box.tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
            assert mask.sum().item() == pytest.approx(ann['area'], abs=0.5)  # polygon and RLE decode alike
    assert kinds == {'listFalse', 'dictstr', 'dictlist'}  # polygons, compressed RLE, uncompressed RLE


def test_training_transform_resizes_and_flips_boxes_and_masks_together(shapes):
    torch.manual_seed(0)
    ds = CocoDetection(shapes, 'train2017', detection_transforms(True, (120, 150), max_size=140, hflip=1.0),
                       with_masks=True, train=True)
    plain = CocoDetection(shapes, 'train2017', with_masks=True, train=True)
    sizes = set()
    for index in range(len(ds)):
        image, target = ds[index]
        h, w = image.shape[-2:]
        sizes.add(min(h, w))
        assert max(h, w) <= 140 and target['masks'].shape[-2:] == (h, w)
        for box, mask in zip(target['boxes'], target['masks']):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert box.tolist() == pytest.approx(mask_box, abs=1.5)
        # flipped: the leftmost original box becomes the rightmost
        original = plain[index][1]['boxes']
        scale = w / plain[index][0].shape[-1]
        assert target['boxes'][:, 2].max().item() == pytest.approx(w - original[:, 0].min().item() * scale, abs=1)
    assert sizes == {120, 140}  # 96x96 images: 150 is capped at 140 by max_size


def test_images_without_annotations(shapes):
    train = CocoDetection(shapes, 'train2017', train=True)
    val = CocoDetection(shapes, 'val2017')
    assert train.skipped['images without annotations'] == 1 and len(train) == 5
    assert len(val) == 3  # evaluation keeps every image
    image, target = val[2]
    assert target['boxes'].shape == (0, 4) and target['labels'].shape == (0,)
    check_same_categories(train, val)


def test_degenerate_boxes_and_crowd_regions_are_skipped_and_counted(dataset_copy):
    root, edit = dataset_copy
    data = edit(lambda d: (d['annotations'][0]['bbox'].__setitem__(2, 0), d['annotations'][1].update(iscrowd=1)))
    ds = CocoDetection(root, 'train2017', train=True)
    assert ds.skipped['boxes with non-positive size'] == 1 and ds.skipped['crowd regions'] == 1
    image_id = data['annotations'][0]['image_id']
    kept = [a for a in data['annotations'][2:] if a['image_id'] == image_id]
    if image_id in ds.image_ids:
        assert len(ds[ds.image_ids.index(image_id)][1]['boxes']) == len(kept)


def _set(key, value, index=0, section='annotations'):
    return lambda d: d[section][index].__setitem__(key, value)


@pytest.mark.parametrize('change, message', [
    (_set('image_id', 424242), 'annotation 1 refers to image id 424242'),
    (_set('category_id', 5), 'annotation 1 (image 001000.png) has category id 5, which is not in the category list'),
    (_set('bbox', [80, 10, 50, 20]), 'annotation 1 (image 001000.png) has bbox [x, y, w, h] = [80, 10, 50, 20]'),
    (_set('bbox', [10, 10, 20]), 'annotation 1 (image 001000.png) has bbox [10, 10, 20]'),
    (_set('width', 200, index=-1, section='images'), '001005.png is 96x96, but the annotation file says 200x96'),
    (_set('file_name', 'nope.png', section='images'), 'image file not found'),
    (_set('id', 1001, section='images'), 'image id 1001 is used 2 times'),
    (lambda d: d.pop('categories'), 'is not a COCO instances file'),
    (_set('segmentation', [[1, 2, 3, 4]]), 'annotation 1 (image 001000.png) has a malformed polygon'),
    (lambda d: d['annotations'][0].pop('segmentation'), 'annotation 1 (image 001000.png) has no segmentation'),
])
def test_bad_annotations_name_the_item(dataset_copy, change, message):
    root, edit = dataset_copy
    edit(change)
    with pytest.raises(DatasetError, match=f'instances_train2017.json|{root}') as info:
        CocoDetection(root, 'train2017', with_masks=True)
    assert message in str(info.value)


def test_bad_files(dataset_copy):
    root, _ = dataset_copy
    json_path = root / 'annotations' / 'instances_train2017.json'
    (root / 'train2017' / '001001.png').write_bytes(b'not an image')
    with pytest.raises(DatasetError, match='cannot read image .*001001.png'):
        CocoDetection(root, 'train2017')
    json_path.write_text('{"images": [')
    with pytest.raises(DatasetError, match='instances_train2017.json is not valid JSON'):
        CocoDetection(root, 'train2017')
    with pytest.raises(DatasetError, match="image folder of split 'test2017' not found"):
        CocoDetection(root, 'test2017')
    with pytest.raises(DatasetError, match='dataset folder not found'):
        CocoDetection(root / 'missing', 'train2017')


def test_splits_with_different_categories(dataset_copy):
    root, edit = dataset_copy
    edit(_set('name', 'square', section='categories'))
    with pytest.raises(DatasetError, match='list different categories'):
        check_same_categories(CocoDetection(root, 'train2017'), CocoDetection(root, 'val2017'))


def test_rle_of_wrong_size(dataset_copy):
    root, edit = dataset_copy
    rle = mask_utils.encode(np.ones((5, 5, 1), dtype=np.uint8, order='F'))[0]
    edit(_set('segmentation', dict(size=[5, 5], counts=rle['counts'].decode())))
    with pytest.raises(DatasetError, match=r'RLE mask without counts or whose size is not \[96, 96\]'):
        CocoDetection(root, 'train2017', with_masks=True)
