"""``hatnet seg train / eval / predict``: semantic segmentation with a Semantic FPN head."""
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import HatNetError
from .app import seg_app

PAPER_RECIPE = 'ade20k_semantic_fpn'
LAYOUT_HELP = ('ade20k: images/ and annotations/{training,validation} (label 0 ignored, classes shifted by one); '
               'folders: images/ and masks/{train,val} with class-index PNGs and an optional classes.yaml')
SLIDE_HELP = 'Sliding-window inference (windows of the crop size, overlapping by a third).'
DATA_OPTIONS, MODEL_OPTIONS, RUN_OPTIONS, OPT_OPTIONS = 'data', 'model', 'run', 'optimisation'


@seg_app.command()
def train(
        data: Optional[str] = typer.Option(None, help='Dataset folder (see --layout).', rich_help_panel=DATA_OPTIONS),
        layout: Optional[str] = typer.Option(None, help=LAYOUT_HELP + ' (recipe: ade20k)',
                                             rich_help_panel=DATA_OPTIONS),
        num_classes: Optional[int] = typer.Option(None, help='(default: read from the data)',
                                                  rich_help_panel=DATA_OPTIONS),
        crop_size: Optional[int] = typer.Option(None, help='Training crop side. (recipe: 512)',
                                                rich_help_panel=DATA_OPTIONS),
        short_side: Optional[int] = typer.Option(None, help='Test scale; training scales are short_side x 0.5..2. '
                                                            '(recipe: 512)', rich_help_panel=DATA_OPTIONS),
        model: Optional[str] = typer.Option(None, help='Backbone: a hat_net variant or any timm features_only model '
                                                       '(e.g. pvt_v2_b1, resnet50). (recipe: hat_net_tiny)',
                                            rich_help_panel=MODEL_OPTIONS),
        pretrained: Optional[str] = typer.Option(None, help='ImageNet checkpoint of the backbone: original HAT-Net '
                                                            '.pth, hatnet .safetensors, classification run (directory '
                                                            'or file), or a timm checkpoint.', rich_help_panel=MODEL_OPTIONS),
        norm: Optional[str] = typer.Option(None, help='Scale-head norm: bn | gn. (recipe: bn)',
                                           rich_help_panel=MODEL_OPTIONS),
        drop_path: Optional[float] = typer.Option(None, help='Backbone stochastic depth. (recipe: 0.1)',
                                                  rich_help_panel=MODEL_OPTIONS),
        out: Optional[str] = typer.Option(None, help='Run directory. (default: runs/seg-MODEL-DATA)',
                                          rich_help_panel=RUN_OPTIONS),
        recipe: Optional[str] = typer.Option(None, help=f"'paper' ({PAPER_RECIPE}, the default), another bundled "
                                                        f"recipe or a YAML file; options given here override it.",
                                             rich_help_panel=RUN_OPTIONS),
        resume: bool = typer.Option(False, '--resume', help='Continue the run in --out (its config.yaml) from its '
                                                            'last checkpoint.', rich_help_panel=RUN_OPTIONS),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an existing run directory.',
                                       rich_help_panel=RUN_OPTIONS),
        iters: Optional[int] = typer.Option(None, help='Optimiser steps. (recipe: 80000)', rich_help_panel=RUN_OPTIONS),
        batch_size: Optional[int] = typer.Option(None, help='Per process. (recipe: 16)', rich_help_panel=RUN_OPTIONS),
        eval_every: Optional[int] = typer.Option(None, help='Steps between evaluations. (recipe: 8000)',
                                                 rich_help_panel=RUN_OPTIONS),
        save_every: Optional[int] = typer.Option(None, help='Steps between checkpoints. (recipe: 8000)',
                                                 rich_help_panel=RUN_OPTIONS),
        workers: Optional[int] = typer.Option(None, help='Data-loading processes per training process.',
                                              rich_help_panel=RUN_OPTIONS),
        threads: Optional[int] = typer.Option(None, help='Intra-op CPU threads per process.',
                                              rich_help_panel=RUN_OPTIONS),
        device: Optional[str] = typer.Option(None, help='auto | cpu | cuda.', rich_help_panel=RUN_OPTIONS),
        lr: Optional[float] = typer.Option(None, help='For a global batch of lr_base_size. (recipe: 1e-4 at 16)',
                                           rich_help_panel=OPT_OPTIONS),
        lr_base_size: Optional[int] = typer.Option(None, help='Scale lr by global batch / this (0: do not scale).',
                                                   rich_help_panel=OPT_OPTIONS),
        weight_decay: Optional[float] = typer.Option(None, help='(recipe: 1e-4)', rich_help_panel=OPT_OPTIONS),
        warmup_iters: Optional[int] = typer.Option(None, help='(recipe: 0)', rich_help_panel=OPT_OPTIONS),
        clip_grad: Optional[float] = typer.Option(None, help='Gradient-norm clipping.', rich_help_panel=OPT_OPTIONS),
        accum_steps: Optional[int] = typer.Option(None, help='Gradient accumulation.', rich_help_panel=OPT_OPTIONS),
        amp: Optional[str] = typer.Option(None, help='none | bf16 | fp16 (CUDA).', rich_help_panel=OPT_OPTIONS),
        seed: Optional[int] = typer.Option(None, rich_help_panel=OPT_OPTIONS),
):
    """Train Semantic FPN: the paper's ADE20K recipe unless --recipe says otherwise; options override it.

    The one trainer: resumable, distributed with torchrun (--batch-size is per process), see docs/training.md.
    """
    options = dict(locals())
    from ..engine import resolve_config
    from ..engine import train as run_training
    from ..tasks.segmentation import SegmentationConfig, SegmentationTask

    recipe = options.pop('recipe') or (None if resume else PAPER_RECIPE)  # a resumed run reads its config.yaml
    options['drop_path_rate'] = options.pop('drop_path')
    options.update(resume=resume or None, overwrite=overwrite or None)
    train_cfg, task_cfg = resolve_config(SegmentationConfig, options, recipe=recipe, aliases={'paper': PAPER_RECIPE})
    if not task_cfg.data:
        raise HatNetError('no dataset given: pass --data DIR')
    if not train_cfg.out:
        train_cfg.out = str(Path('runs') / f'seg-{task_cfg.model}-{Path(task_cfg.data).name}')
    task = SegmentationTask(task_cfg)
    task.check_inputs()  # before the run directory is touched
    run_training(task, train_cfg)


@seg_app.command()
def shapes(
        out: Path = typer.Argument(..., help='Output folder (must not exist or be empty).'),
        layout: str = typer.Option('folders', help='folders or ade20k.'),
        train: int = typer.Option(256, min=1, help='Training images.'),
        val: int = typer.Option(64, min=1, help='Validation images.'),
        min_size: int = typer.Option(64, min=32, help='Smallest image side.'),
        max_size: int = typer.Option(96, min=32, help='Largest image side.'),
        seed: int = typer.Option(0, help='Random seed.'),
):
    """Write a synthetic dataset to try training offline: coloured discs, boxes and triangles on textured
    backgrounds, 4 classes with 'background', shape outlines unlabelled."""
    from ..data.segmentation import get_layout, write_shapes_dataset
    get_layout(layout)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HatNetError(f'{out} already exists and is not an empty folder; not writing into it')
    write_shapes_dataset(out, layout, train, val, size=(min_size, max(min_size, max_size)), seed=seed)
    Console().print(f'wrote {train} training and {val} validation images ({layout} layout) to {out}')


def _fraction(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def _write_csv(path: Path, result: dict) -> None:
    from ..fileio import write_csv_atomic
    cell = lambda value: '' if math.isnan(value) else f'{value:.6f}'  # noqa: E731
    rows = [[name, cell(iou), cell(acc)] for name, iou, acc in zip(result['class_names'], result['IoU'], result['Acc'])]
    rows += [['mean (mIoU, mAcc)', cell(result['mIoU']), cell(result['mAcc'])],
             ['all pixels (aAcc)', '', cell(result['aAcc'])]]
    write_csv_atomic(path, ['class', 'IoU', 'Acc'], rows)


@seg_app.command('eval')
def evaluate(
        data: str = typer.Option(..., help='Dataset folder.'),
        checkpoint: Path = typer.Option(..., help='Run directory (its best checkpoint) or a checkpoint file.'),
        layout: Optional[str] = typer.Option(None, help=LAYOUT_HELP + ' (default: the run\'s)'),
        split: Optional[str] = typer.Option(None, help='Split folder name. (default: validation / val)'),
        short_side: Optional[int] = typer.Option(None, help='Test scale. (default: the run\'s, 512 in the recipe)'),
        slide: bool = typer.Option(False, help=SLIDE_HELP),
        window: Optional[int] = typer.Option(None, help='Sliding-window side. (default: the run\'s crop size)'),
        flip: bool = typer.Option(False, help='Average with the horizontally flipped image.'),
        json_out: bool = typer.Option(False, '--json', help='Print one JSON object (metrics as fractions 0..1).'),
        csv_path: Optional[Path] = typer.Option(None, '--csv', help='Per-class CSV. (default: seg_eval_<split>.csv '
                                                                     'beside the checkpoint)'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N.'),
        workers: int = typer.Option(2, help='Data-loading processes.'),
):
    """mIoU, mAcc, aAcc and per-class IoU / Acc of a trained model (single scale; optionally sliding window, flip)."""
    from ..tasks.segmentation import evaluate_checkpoint
    result = evaluate_checkpoint(checkpoint, data, layout=layout, split=split, flip=flip, workers=workers,
                                 progress=not json_out, device=device, short_side=short_side, slide=slide,
                                 window=window)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    csv_path = csv_path or run_dir / f'seg_eval_{result["split"]}.csv'
    _write_csv(csv_path, result)
    summary = {key: _fraction(result[key]) for key in ('mIoU', 'mAcc', 'aAcc')}
    if json_out:
        per_class = {name: dict(IoU=_fraction(iou), Acc=_fraction(acc))
                     for name, iou, acc in zip(result['class_names'], result['IoU'], result['Acc'])}
        print(json.dumps(dict(summary, per_class=per_class, split=result['split'], images=result['images'],
                              short_side=result['short_side'], window=result['window'], flip=result['flip'],
                              checkpoint=str(checkpoint), csv=str(csv_path))))
        return
    table = Table(title=f'{checkpoint} on {data} ({result["split"]}, {result["images"]} images)')
    for column in ('class', 'IoU %', 'Acc %'):
        table.add_column(column, justify='left' if column == 'class' else 'right')
    percent = lambda value: '-' if math.isnan(value) else f'{100 * value:.2f}'  # noqa: E731
    for name, iou, acc in zip(result['class_names'], result['IoU'], result['Acc']):
        table.add_row(name, percent(iou), percent(acc))
    table.add_section()
    table.add_row('[bold]mean[/]', f'[bold]{percent(result["mIoU"])}[/]', f'[bold]{percent(result["mAcc"])}[/]')
    table.add_row('all pixels (aAcc)', '', percent(result['aAcc']))
    console = Console()
    console.print(table)
    console.print(f'mIoU {percent(result["mIoU"])}  mAcc {percent(result["mAcc"])}  aAcc {percent(result["aAcc"])}'
                  f'  (per-class CSV: {csv_path})')


@seg_app.command()
def predict(
        images: List[Path] = typer.Argument(..., help='Image files.'),
        checkpoint: Path = typer.Option(..., help='Run directory (its best checkpoint) or a checkpoint file.'),
        out: Path = typer.Option(Path('seg_predictions'), help='Output folder.'),
        short_side: Optional[int] = typer.Option(None, help='Test scale. (default: the run\'s)'),
        slide: bool = typer.Option(False, help=SLIDE_HELP),
        window: Optional[int] = typer.Option(None, help='Sliding-window side. (default: the run\'s crop size)'),
        flip: bool = typer.Option(False, help='Average with the horizontally flipped image.'),
        alpha: float = typer.Option(0.5, min=0.0, max=1.0, help='Opacity of the colours in the overlay.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N.'),
        json_out: bool = typer.Option(False, '--json', help='Print one JSON list instead of a table.'),
):
    """Segment images: <stem>_mask.png (class indices as a colour-palette PNG) and <stem>_overlay.png per image."""
    from ..tasks.segmentation import predict_images
    results = predict_images(checkpoint, images, out, flip=flip, alpha=alpha, device=device, short_side=short_side,
                             slide=slide, window=window)
    if json_out:
        print(json.dumps(results))
        return
    table = Table(title=f'predictions of {checkpoint} in {out}')
    for column in ('image', 'size', 'mask', 'overlay', 'largest classes'):
        table.add_column(column)
    for r in results:
        table.add_row(r['image'], 'x'.join(map(str, r['size'])), Path(r['mask']).name, Path(r['overlay']).name,
                      ', '.join(f'{name} {100 * share:.0f}%' for name, share in r['classes'].items()))
    Console().print(table)
