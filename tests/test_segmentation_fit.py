"""The segmentation ``auto`` recipe: the paper's recipe, fitted to the data's sizes and the device."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from hatnet.data.segmentation import write_shapes_dataset
from hatnet.engine.config import build_configs, find_recipe, load_recipe
from hatnet.engine.fitting import apply_choices
from hatnet.errors import DatasetError
from hatnet.tasks import segmentation
from hatnet.tasks.segmentation import SegmentationConfig, fit_recipe

CPU = torch.device('cpu')


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('small'), 'folders', num_train=12, num_val=2,
                                size=(96, 128), seed=3)


def paper(**options):
    """The configs ``hatnet seg train --recipe auto`` starts from, with ``options`` given on the command line."""
    values = dict(load_recipe(find_recipe('ade20k_semantic_fpn')), **options)
    return build_configs(values, SegmentationConfig)


def fitted(data, device=CPU, **options):
    """(train config, task config, choices) after the auto recipe, as the engine applies it."""
    given = dict(data=str(data), **options)
    train_cfg, task_cfg = paper(**given)
    choices = fit_recipe(task_cfg, train_cfg, frozenset(given), device)
    apply_choices(train_cfg, task_cfg, choices, given)
    return train_cfg, task_cfg, {c.key: c for c in choices}


def test_small_images_get_their_own_scale_and_a_short_schedule(small):
    train_cfg, task_cfg, choices = fitted(small)
    assert task_cfg.layout == 'folders'   # found from the folders, not the recipe's ade20k
    assert 96 <= task_cfg.short_side <= 128 and task_cfg.crop_size <= task_cfg.short_side
    short_sides = [min(Image.open(path).size) for path in (small / 'images' / 'train').iterdir()]
    assert task_cfg.short_side >= np.median(short_sides)   # never shrinks the typical image
    assert task_cfg.ratio_range[0] >= 0.5 and task_cfg.ratio_range[1] <= 2
    assert 0 < train_cfg.iters <= 1000 and train_cfg.eval_every <= train_cfg.iters // 2
    assert 0 < train_cfg.warmup_iters < train_cfg.iters // 5
    assert train_cfg.batch_size <= 16 and task_cfg.norm == 'bn' and task_cfg.drop_path_rate == 0
    assert task_cfg.head == 'unet'        # a backbone from scratch: the decoder that learns from few images
    assert task_cfg.ratio_range == [1.0, 1.0]   # ... at the test scale: scale jitter slows a short run
    effective_lr = train_cfg.lr * train_cfg.batch_size / train_cfg.lr_base_size
    assert 1e-4 < effective_lr < 1e-2
    assert all(isinstance(c.why, str) and c.why and '\n' not in c.why for c in choices.values())


def test_ade20k_sized_data_keeps_the_paper_recipe(small, monkeypatch):
    # 20k images with a 512 px short side: only the headers are looked at, so they are stood in for
    monkeypatch.setattr(segmentation, '_data_sizes', lambda root, layout: (20210, [512] * 200))
    train_cfg, task_cfg = paper(data=str(small), layout='folders')
    assert fit_recipe(task_cfg, train_cfg, frozenset({'data', 'layout'}), CPU) == []
    # a few large images are not ADE20K: the schedule is fitted, the scale kept
    monkeypatch.setattr(segmentation, '_data_sizes', lambda root, layout: (200, [512] * 200))
    _, task_cfg, choices = fitted(small, layout='folders')
    assert 'iters' in choices and task_cfg.short_side == task_cfg.crop_size == 512


def test_given_settings_are_kept_and_the_related_choices_follow_them(small):
    train_cfg, task_cfg, choices = fitted(small, batch_size=2, iters=200, short_side=64, layout='folders')
    assert (train_cfg.batch_size, train_cfg.iters, task_cfg.short_side) == (2, 200, 64)
    assert not {'batch_size', 'iters', 'short_side', 'layout'} & set(choices)
    assert task_cfg.crop_size == 64                       # crops of the given scale
    assert task_cfg.norm == 'gn'                          # batch statistics of 2 images are too noisy
    assert train_cfg.warmup_iters < 200 // 5 and train_cfg.eval_every <= 100   # of the given length
    default, _, _ = fitted(small)
    lr_per_image = default.lr / default.lr_base_size   # the default run's lr, divided by its batch
    assert train_cfg.lr * 2 / train_cfg.lr_base_size == pytest.approx(lr_per_image * 2)   # lr follows the batch

    # an lr without linear scaling (lr_base_size 0) is chosen for the given batch itself
    train_cfg, _, choices = fitted(small, batch_size=4, lr_base_size=0)
    assert train_cfg.lr_base_size == 0 and train_cfg.lr == pytest.approx(lr_per_image * 4)

    # what the user gave is never replaced, even where the auto recipe would differ
    train_cfg, task_cfg, choices = fitted(small, batch_size=2, lr=3e-4, norm='bn', drop_path_rate=0.2,
                                          warmup_iters=0, head='fpn')
    assert (train_cfg.lr, task_cfg.norm, task_cfg.drop_path_rate, train_cfg.warmup_iters) == (3e-4, 'bn', 0.2, 0)
    assert task_cfg.head == 'fpn'
    assert not {'lr', 'norm', 'drop_path_rate', 'warmup_iters', 'head'} & set(choices)


def test_a_pretrained_backbone_keeps_the_papers_fine_tuning_lr(small, tmp_path):
    train_cfg, task_cfg, choices = fitted(small, pretrained=str(tmp_path / 'weights.pth'))
    paper_train, paper_task = paper()
    assert train_cfg.lr == paper_train.lr and task_cfg.drop_path_rate == paper_task.drop_path_rate
    assert task_cfg.head == paper_task.head == 'fpn'   # ImageNet features: the paper's Semantic FPN
    assert task_cfg.ratio_range == [0.75, 1.5]          # small images: a narrower scale jitter than 0.5-2x
    assert 'lr' not in choices and 'iters' in choices


def test_the_gpu_keeps_the_papers_batch(small):
    train_cfg, task_cfg, choices = fitted(small, device=torch.device('cuda'))
    assert 'batch_size' not in choices and train_cfg.batch_size == paper()[0].batch_size
    assert task_cfg.norm == 'bn'   # 16 images per process: batch statistics hold


def test_every_choice_is_a_setting_of_the_configs(small):
    train_cfg, task_cfg, choices = fitted(small)
    names = {f.name for f in dataclasses.fields(train_cfg)} | {f.name for f in dataclasses.fields(task_cfg)}
    assert set(choices) <= names


def test_missing_or_wrong_data_is_one_clear_error(small, tmp_path):
    with pytest.raises(DatasetError, match='dataset folder not found'):
        fitted(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='missing folder'):
        fitted(tmp_path / 'empty')
