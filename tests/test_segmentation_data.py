"""Segmentation datasets: layouts, label mapping, checks with clear errors, joint augmentation."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

from hatnet.data.segmentation import (
    ADE20K_CLASSES, LAYOUTS, RandomCropCatMaxRatio, SHAPE_CLASSES, SegmentationDataset, colorize, eval_transform,
    load_data, make_palette, train_transform, write_shapes_dataset)
from hatnet.errors import DatasetError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('folders'), 'folders', num_train=6, num_val=3)


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('ade'), 'ade20k', num_train=6, num_val=3)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_folders_layout(folders):
    data = load_data(folders, 'folders')
    assert data.class_names == list(SHAPE_CLASSES)
    assert data.ignore_index == 255 and not data.reduce_zero_label
    assert [len(data.samples[s]) for s in ('train', 'val')] == [6, 3]
    image, mask = data.samples['val'][0]
    assert image.stem == mask.stem and mask.parent == folders / 'masks' / 'val'
    # without joint augmentation the mask keeps its size and values
    dataset = SegmentationDataset(data.samples['val'], eval_transform(32, MEAN, STD), joint=False)
    x, y = dataset[0]
    stored = np.asarray(Image.open(mask))
    assert torch.equal(y, torch.from_numpy(stored.astype(np.int64)))
    assert x.dtype == torch.float32 and min(x.shape[1:]) == 32


def test_ade20k_layout_shifts_labels_and_ignores_zero(ade):
    data = load_data(ade, 'ade20k')
    assert data.reduce_zero_label and data.num_classes == 4 and data.class_names[0] == 'class_0'
    assert list(data.samples) == list(LAYOUTS['ade20k'].splits)
    _, mask = data.samples['training'][0]
    stored = torch.from_numpy(np.asarray(Image.open(mask)).astype(np.int64))
    _, labels = SegmentationDataset(data.samples['training'], eval_transform(32, MEAN, STD), 255, True, joint=False)[0]
    assert (stored == 0).any()
    assert torch.equal(labels == 255, stored == 0)
    assert torch.equal(labels[stored > 0], stored[stored > 0] - 1)


def test_ade20k_names_for_150_classes(ade):
    data = load_data(ade, 'ade20k', num_classes=150)
    assert data.class_names == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150


def _error(root, layout='folders', **kwargs):
    with pytest.raises(DatasetError) as info:
        load_data(root, layout, **kwargs)
    return str(info.value)


def test_size_mismatch_names_the_mask(folders, tmp_path):
    root = _copy(folders, tmp_path / 'd')
    mask = root / 'masks' / 'val' / '00001.png'
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    message = _error(root)
    assert str(mask) in message and '12x10' in message


def test_label_out_of_range_names_the_mask(folders, ade, tmp_path):
    root = _copy(folders, tmp_path / 'f')
    mask = root / 'masks' / 'train' / '00002.png'
    labels = np.asarray(Image.open(mask)).copy()
    labels[0, 0] = 7
    Image.fromarray(labels).save(mask)
    message = _error(root)
    assert str(mask) in message and 'label 7' in message and '4 classes' in message
    # the ignore index itself is fine, as is any label when the classes are read from the data
    root = _copy(ade, tmp_path / 'a')
    assert load_data(root, 'ade20k').num_classes == 4
    message = _error(root, 'ade20k', num_classes=3)
    assert 'label 4' in message and '1..3 (0 = unlabelled)' in message


@pytest.mark.parametrize('problem', ['image_without_mask', 'mask_without_image', 'empty_split', 'missing_folder',
                                     'rgb_mask', 'not_an_image', 'bad_class_file'])
def test_bad_dataset_is_one_clear_error(folders, tmp_path, problem):
    root = _copy(folders, tmp_path / 'd')
    val_images, val_masks = root / 'images' / 'val', root / 'masks' / 'val'
    if problem == 'image_without_mask':
        (val_masks / '00000.png').unlink()
        expected = [str(val_images / '00000.png'), 'has no mask']
    elif problem == 'mask_without_image':
        (val_images / '00000.png').unlink()
        expected = [str(val_masks / '00000.png'), 'has no image']
    elif problem == 'empty_split':
        for path in val_images.iterdir():
            path.unlink()
        expected = ['empty split', str(val_images)]
    elif problem == 'missing_folder':
        for path in val_masks.iterdir():
            path.unlink()
        val_masks.rmdir()
        expected = ['missing folder', str(val_masks)]
    elif problem == 'rgb_mask':
        Image.new('RGB', Image.open(val_images / '00001.png').size).save(val_masks / '00001.png')
        expected = [str(val_masks / '00001.png'), 'RGB']
    elif problem == 'not_an_image':
        (val_images / '00002.png').write_bytes(b'not a png')
        expected = [str(val_images / '00002.png'), 'cannot read']
    else:
        (root / 'classes.yaml').write_text(yaml.safe_dump(dict(classes=['a', 'b'], ignore_index=1)))
        expected = ['classes.yaml', 'ignore_index']
    message = _error(root)
    for part in expected:
        assert part in message


def _erode(region: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """The pixels whose whole (2 radius + 1)^2 neighbourhood lies in ``region`` (away from blurred edges)."""
    return -torch.nn.functional.max_pool2d(-region[None].float(), 2 * radius + 1, 1, radius)[0] > 0


def test_train_transform_keeps_image_and_mask_aligned():
    """Bright pixels are class 1, dark ones class 0: after resizing, cropping, flipping and photometric
    distortion the mask must still mark the bright pixels (away from the blurred boundaries)."""
    torch.manual_seed(0)
    labels = torch.zeros(90, 120, dtype=torch.int64)
    labels[20:70, 10:50] = 1
    labels[5:30, 80:115] = 1
    image = tv_tensors.Image((labels * 200 + 20).to(torch.uint8).expand(3, -1, -1).clone())
    transform = train_transform(64, 80, MEAN, STD, cat_max_ratio=0.75)
    checked = 0
    for _ in range(10):
        x, y = transform(image, tv_tensors.Mask(labels))
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        assert set(y.unique().tolist()) <= {0, 1, 255}
        grey = x.mean(0)
        bright, dark = grey[_erode(y == 1)], grey[_erode(y == 0)]
        if len(bright) and len(dark):
            assert bright.min() > dark.max()
            checked += 1
    assert checked >= 5


def test_crop_pads_small_images_with_ignore():
    labels = tv_tensors.Mask(torch.zeros(20, 30, dtype=torch.int64))
    image = tv_tensors.Image(torch.full((3, 20, 30), 9, dtype=torch.uint8))
    x, y = RandomCropCatMaxRatio(40, cat_max_ratio=1.0, image_fill=(1, 2, 3))(image, labels)
    assert y.shape == (40, 40) and (y == 0).sum() == 20 * 30 and (y == 255).sum() == 40 * 40 - 600
    assert (x[:, y == 255] == torch.tensor([1, 2, 3])[:, None]).all()


def test_cat_max_ratio_prefers_crops_with_several_classes():
    labels = torch.zeros(100, 100, dtype=torch.int64)
    labels[:40, :40] = 1
    image, mask = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8)), tv_tensors.Mask(labels)

    def mixed_share(crop):
        torch.manual_seed(0)
        mixed = 0
        for _ in range(60):
            counts = torch.bincount(crop(image, mask)[1].flatten(), minlength=2)
            mixed += int(counts.max() < 0.75 * counts.sum())
        return mixed / 60

    assert mixed_share(RandomCropCatMaxRatio(40, 0.75)) > 0.4 > 0.2 > mixed_share(RandomCropCatMaxRatio(40, 1.0))


def test_palette_and_colorize():
    palette = make_palette(300)
    assert len(set(palette)) == 300 and palette[0] == (0, 0, 0)
    mask = np.array([[0, 1], [2, 1]])
    image = colorize(mask, palette[:3])
    assert image.mode == 'P' and np.array_equal(np.asarray(image), mask)
    assert np.array_equal(np.asarray(image.convert('RGB'))[1, 0], palette[2])
    rgb = colorize(np.array([[299, 0]]), palette)
    assert rgb.mode == 'RGB' and tuple(np.asarray(rgb)[0, 0]) == palette[299]
