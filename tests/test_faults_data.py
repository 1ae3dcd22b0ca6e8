"""Faults in the data and the weights: file names leading out of a data root, ids of the wrong type, stray
labels, a single class, broken images found before training, images the model cannot take, weights that fit
but are not usable."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import hatnet
from detection_shapes import write_shapes_dataset as write_coco_shapes
from hatnet.data.classification import classification_dataset
from hatnet.data.detection import CocoDetection
from hatnet.data.images import image_size, read_image
from hatnet.data.segmentation import load_data, write_shapes_dataset
from hatnet.errors import CheckpointError, DatasetError, InputError
from hatnet.fileio import resolve_inside
from hatnet.models import create
from hatnet.models.semantic_fpn import SemanticFPN
from hatnet.tasks.classification import ClassificationConfig, ClassificationTask
from hatnet.tasks.segmentation import SegmentationPredictor
from test_classification import make_image_folder
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)

SRC = Path(hatnet.__file__).parent


# ---------------------------------------------------------------------------------------------- data roots
@pytest.mark.parametrize('name', ['ok.png', 'sub/dir/ok.png', 'sub/../ok.png'])
def test_file_names_inside_the_root_resolve(tmp_path, name):
    assert resolve_inside(tmp_path, name) == tmp_path / Path(name).as_posix().replace('sub/../', '')


@pytest.mark.parametrize('name', ['../outside.png', '../../outside.png', 'sub/../../outside.png', '/abs/outside.png',
                                  '', 'a\0b.png', 7, None])
def test_file_names_leading_out_of_the_root_are_refused(tmp_path, name):
    with pytest.raises(DatasetError, match=re.escape(f'the file name {name!r}')):
        resolve_inside(tmp_path / 'root', name, 'the file')


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_coco_shapes(tmp_path_factory.mktemp('coco'), train=3, val=2, size=(40, 48))


def _edited(coco, tmp_path, change, split='val2017') -> Path:
    root = tmp_path / 'coco'
    shutil.copytree(coco, root)
    path = root / 'annotations' / f'instances_{split}.json'
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize('escape', ['../../secret.png', '../train2017/../../secret.png', 'ABSOLUTE'])
def test_coco_file_names_cannot_leave_the_image_folder_nor_tell_what_is_outside(coco, tmp_path, escape):
    """The same message whether or not a file exists at the outside path: the error says nothing about it."""
    messages = []
    for exists in (True, False):
        case = tmp_path / str(exists)
        case.mkdir()
        secret = case / 'secret.png'
        if exists:
            Image.new('RGB', (48, 40)).save(secret)  # even the size the json gives
        name = str(secret) if escape == 'ABSOLUTE' else escape

        def change(data):
            data['images'][0]['file_name'] = name
        root = _edited(coco, case, change)
        with pytest.raises(DatasetError) as info:
            CocoDetection(root, 'val2017')
        messages.append(str(info.value).replace(str(case), 'CASE'))
    assert messages[0] == messages[1]
    assert 'outside' in messages[0] and 'not found' not in messages[0] and 'is 48x40' not in messages[0]


@pytest.mark.parametrize('change, message', [
    (lambda d: d['images'][0].update(id='1000'), "image #0 has id '1000'; expected an integer"),
    (lambda d: [c.update(id=str(c['id'])) for c in d['categories']], "category #0 has id '3'; expected an integer"),
    (lambda d: d['annotations'][0].update(category_id=str(d['annotations'][0]['category_id'])),
     'annotation #0 has category_id'),
    (lambda d: d['annotations'][0].update(image_id=True), 'annotation #0 has image_id True'),
    (lambda d: d['images'][0].update(width=48.5), 'image #0 has width 48.5'),
    (lambda d: d['annotations'][0].update(bbox=[1, 2, float('nan'), 4]), 'has bbox [1, 2, nan, 4]'),
])
def test_coco_values_of_the_wrong_type_are_one_error(coco, tmp_path, change, message):
    root = _edited(coco, tmp_path, change)
    with pytest.raises(DatasetError, match=re.escape(message)):
        CocoDetection(root, 'val2017')


# ---------------------------------------------------------------------------------------------- labels
@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('shapes'), 'folders', num_train=4, num_val=2, size=(32, 40))


def _with_stray_labels(shapes, tmp_path, value=200, masks=1, class_file=True) -> Path:
    root = tmp_path / 'shapes'
    shutil.copytree(shapes, root)
    if not class_file:
        (root / 'classes.yaml').unlink()
    for mask in sorted((root / 'masks' / 'train').glob('*.png'))[:masks]:
        labels = np.asarray(Image.open(mask)).copy()
        labels[0, 0] = value
        Image.fromarray(labels).save(mask)
    return root


def test_a_stray_label_does_not_grow_the_inferred_classes(shapes, tmp_path):
    assert load_data(_with_stray_labels(shapes, tmp_path / 'a', value=3, class_file=False), 'folders').num_classes == 4
    root = _with_stray_labels(shapes, tmp_path / 'b', class_file=False)
    with pytest.raises(DatasetError, match=r'not 0\.\.N-1: 196 of the values up to the largest, 200, never occur; '
                                           r'the rarest are label 200 in 1 mask \(1 pixel, e\.g\. .*/00000\.png\)'):
        load_data(root, 'folders')


def test_labels_beyond_the_declared_classes_are_counted(shapes, tmp_path):
    root = _with_stray_labels(shapes, tmp_path, value=7, masks=2)
    with pytest.raises(DatasetError, match=r'outside the 4 classes: label 7 in 2 masks \(2 pixels, e\.g\. .*00000\.png'
                                           r'\); valid values are 0\.\.3 and the ignore index 255'):
        load_data(root, 'folders')
    with pytest.raises(DatasetError, match='label 7 in 2 masks'):  # and the same when evaluating with 4 classes
        load_data(_with_stray_labels(shapes, tmp_path / 'b', value=7, masks=2, class_file=False), 'folders',
                  num_classes=4)


def test_a_single_class_classification_set_is_refused(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=(2, 1), size=32)
    for split in ('train', 'val'):
        for name in ('green', 'red'):
            shutil.rmtree(root / split / name)
    task = ClassificationTask(ClassificationConfig(data=str(root), img_size=32))
    with pytest.raises(DatasetError, match='has one class \\(blue\\): a classifier needs at least two'):
        task.build_datasets()
    with pytest.raises(hatnet.HatNetError, match='num_classes must be >= 2, got 1'):
        ClassificationTask(ClassificationConfig(data=str(root), num_classes=1))


# ---------------------------------------------------------------------------------------------- images
def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_broken_validation_image_is_found_when_the_dataset_is_built(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=(2, 1), size=32)
    _truncated(root / 'val' / 'red' / '0.png')
    (root / 'val' / 'blue' / 'not_an_image.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    with pytest.raises(DatasetError, match=f'cannot read image {root}/val/blue/not_an_image.jpg'):
        classification_dataset(str(root), 'val')
    (root / 'val' / 'blue' / 'not_an_image.jpg').unlink()
    with pytest.raises(DatasetError, match=f'cannot read image {root}/val/red/0.png'):
        classification_dataset(str(root), 'val')
    classification_dataset(str(root), 'train')


def test_broken_segmentation_and_detection_images_are_found_up_front(shapes, coco, tmp_path):
    root = tmp_path / 'seg'
    shutil.copytree(shapes, root)
    _truncated(sorted((root / 'images' / 'val').glob('*.png'))[-1])
    with pytest.raises(DatasetError, match='cannot read image .*/images/val/00001.png'):
        load_data(root, 'folders')
    root = tmp_path / 'coco'
    shutil.copytree(coco, root)
    _truncated(sorted((root / 'val2017').glob('*.png'))[-1])
    with pytest.raises(DatasetError, match='cannot read image .*/val2017/001001.png'):
        CocoDetection(root, 'val2017')


def test_only_the_image_reader_opens_images():
    """Every image file goes through data/images.py (EXIF orientation, bit depths, the bomb limit); the one other
    reader is the segmentation masks', which keeps the stored class indices. (The web server decodes uploaded
    bytes, which it hands to read_image.)"""
    opening = re.compile(r'Image\.open\(|imread\(|decode_image\(|default_loader')
    opened = {path.relative_to(SRC).as_posix(): len(opening.findall(path.read_text())) for path in SRC.rglob('*.py')
              if opening.search(path.read_text()) and path.relative_to(SRC).parts[0] != 'serve'}
    assert opened == {'data/images.py': 1, 'data/segmentation.py': 1}, opened
    assert 'loader=partial(read_image' in (SRC / 'data/classification.py').read_text()  # not ImageFolder's own


def test_the_decompression_bomb_limit_is_one_error(tmp_path, monkeypatch):
    Image.new('L', (64, 64)).save(tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 64 x 64 is more than twice the limit
    for read in (read_image, image_size):
        with pytest.raises(InputError, match='cannot read image .*bomb.png: Image size \\(4096 pixels\\) exceeds'):
            read(tmp_path / 'bomb.png')


def test_images_the_model_cannot_take_are_refused_before_any_is_predicted(tmp_path):
    predictor = SegmentationPredictor(SemanticFPN('resnet10t', 2), ['a', 'b'], 'cpu', model_name='resnet10t',
                                      short_side=32)
    calls = []
    predictor.model.register_forward_hook(lambda *args: calls.append(1))
    good, thin = np.zeros((40, 40, 3), np.uint8), np.zeros((1, 400, 3), np.uint8)
    with pytest.raises(InputError, match=r'is 400x1: at the model\'s scale .* it would be 128x0, under the 32 px'):
        predictor.predict([good, thin])
    assert not calls
    assert predictor.predict([np.zeros((8, 8, 3), np.uint8)])[0].mask.shape == (8, 8)  # small is fine: resized


# ---------------------------------------------------------------------------------------------- weights
@pytest.fixture(scope='module')
def tiny_weights():
    return timm.create_model('hat_net_tiny', num_classes=3).state_dict()


@pytest.mark.parametrize('damage, message, everywhere', [
    (lambda sd: dict(sd, **{'stages.1.blocks.0.attn.qkv.weight': sd['stages.1.blocks.0.attn.qkv.weight'] * np.nan}),
     r'holds NaN or infinite values in 1 weights \(e.g. stages.1.blocks.0.attn.qkv.weight\)', True),
    (lambda sd: {k: (v * 10).to(torch.int8) if v.is_floating_point() else v for k, v in sd.items()},
     'holds torch.int8 values in 295 weights', False),
    (lambda sd: dict(sd, **{'head.bias': sd['head.bias'] + float('inf')}), 'NaN or infinite values', False),
])
def test_weights_that_fit_but_are_unusable_are_refused(tmp_path, tiny_weights, damage, message, everywhere):
    path = tmp_path / 'damaged.safetensors'
    save_file({k: v.contiguous() for k, v in damage(tiny_weights).items()}, path)
    loads = [lambda: create('hat_net_tiny', path)]
    if everywhere:  # the predictors and timm's own pretrained path check the same way
        loads += [lambda: hatnet.load(path, device='cpu'),
                  lambda: timm.create_model('hat_net_tiny', num_classes=3, pretrained=True,
                                            pretrained_cfg_overlay=dict(file=str(path)))]
    for load in loads:
        with pytest.raises(CheckpointError, match=message):
            load()


def test_half_precision_weights_still_load(tmp_path, tiny_weights):
    path = tmp_path / 'half.safetensors'
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in tiny_weights.items()}, path)
    assert create('hat_net_tiny', path).num_classes == 3


def test_segmentation_class_files_and_classification_sets_keep_their_checks(shapes, tmp_path):
    """The label checks above are the only change: a class file still declares the classes."""
    root = tmp_path / 'shapes'
    shutil.copytree(shapes, root)
    (root / 'classes.yaml').write_text(yaml.safe_dump(dict(classes=['a', 'b', 'c', 'd', 'e'])))
    assert load_data(root, 'folders').num_classes == 5  # a declared class may be absent from the data
