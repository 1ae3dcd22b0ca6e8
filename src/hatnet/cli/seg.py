"""``hatnet seg eval / predict / shapes``: semantic segmentation with a Semantic FPN head."""
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..engine.run_dir import check_output_folder, check_outputs
from .app import console, seg_app
from .options import (AmpOption, ShapesMax, ShapesMaxSize, ShapesMinSize, ShapesOut, ShapesSeed, ShapesTrain, ShapesVal,
                      check_new_dataset_folder)

LAYOUT_HELP = ('ade20k: images/ and annotations/{training,validation} (label 0 ignored, classes shifted by one); '
               'folders: images/ and masks/{train,val} with class-index PNGs and an optional classes.yaml')
SLIDE_HELP = 'Sliding-window inference (windows of the crop size, overlapping by a third).'


@seg_app.command()
def shapes(
        out: ShapesOut,
        layout: str = typer.Option('folders', help='folders or ade20k.'),
        train: ShapesTrain = 300,
        val: ShapesVal = 60,
        min_size: ShapesMinSize = 96,
        max_size: ShapesMaxSize = 128,
        max_shapes: ShapesMax = 3,
        seed: ShapesSeed = 0,
):
    """Write a synthetic dataset to try training offline: 1-3 circles, squares and triangles per image, each in
    a random colour, size and rotation on a random noisy background, so that only geometry tells the classes
    apart; 4 classes with 'background', the blended borders between regions unlabelled."""
    from ..data.segmentation import get_layout, write_shapes_dataset
    get_layout(layout)
    check_new_dataset_folder(out, min_size, max_size)
    write_shapes_dataset(out, layout, train, val, size=(min_size, max_size), seed=seed,
                         max_shapes=max_shapes)
    console().print(f'wrote {train} training and {val} validation images ({layout} layout) to {out}')


def _without_nan(value):
    """NaN (a class that occurs nowhere) as None, which JSON can hold."""
    if isinstance(value, dict):
        return {key: _without_nan(v) for key, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_csv(path: Path, result: dict) -> None:
    from ..fileio import write_csv_atomic
    cell = lambda value: '' if math.isnan(value) else f'{value:.6f}'  # noqa: E731
    rows = [[name, cell(scores['IoU']), cell(scores['Acc'])] for name, scores in result['per_class'].items()]
    rows += [['mean (mIoU, mAcc)', cell(result['mIoU']), cell(result['mAcc'])],
             ['all pixels (aAcc)', '', cell(result['aAcc'])]]
    write_csv_atomic(path, ['class', 'IoU', 'Acc'], rows)


@seg_app.command('eval')
def evaluate(
        data: str = typer.Option(..., help='Dataset folder.'),
        checkpoint: Path = typer.Option(..., help='Run directory (its best checkpoint) or a checkpoint file.'),
        layout: Optional[str] = typer.Option(None, help=LAYOUT_HELP + ' (default: the run\'s)'),
        split: Optional[str] = typer.Option(None, help='Split folder name. (default: validation / val)'),
        short_side: Optional[int] = typer.Option(None, min=32, help='Test scale. (default: the run\'s, 512 in the '
                                                                     'recipe)'),
        slide: bool = typer.Option(False, help=SLIDE_HELP),
        window: Optional[int] = typer.Option(None, min=32, help='Sliding-window side. (default: the run\'s crop size)'),
        flip: bool = typer.Option(False, help='Average with the horizontally flipped image.'),
        json_out: bool = typer.Option(False, '--json', help='Print one JSON object (metrics as fractions 0..1).'),
        csv_path: Optional[Path] = typer.Option(None, '--csv', help='Per-class CSV. (default: seg_eval_<split>.csv '
                                                                     'beside the checkpoint)'),
        overwrite: bool = typer.Option(False, help='Replace the --csv file if it exists.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N.'),
        amp: AmpOption = 'none',
        workers: int = typer.Option(2, min=0, help='Data-loading processes.'),
):
    """mIoU, mAcc, aAcc and per-class IoU / Acc of a trained model (single scale; optionally sliding window, flip)."""
    from ..tasks.segmentation import SegmentationTask
    if csv_path is not None:  # the default CSV beside the checkpoint is the run's own report, refreshed each time
        check_outputs([csv_path], overwrite)
    predictor = SegmentationTask.load(checkpoint, device, short_side=short_side, slide=slide, window=window,
                                      amp=amp)
    result = predictor.evaluate(data, layout=layout, split=split, flip=flip, workers=workers, progress=not json_out)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    csv_path = csv_path or run_dir / f'seg_eval_{result["split"]}.csv'
    _write_csv(csv_path, result)
    if json_out:
        print(json.dumps(dict(_without_nan(result), checkpoint=str(checkpoint), csv=str(csv_path))))
        return
    table = Table(title=f'{checkpoint} on {data} ({result["split"]}, {result["images"]} images)')
    for column in ('class', 'IoU %', 'Acc %'):
        table.add_column(column, justify='left' if column == 'class' else 'right')
    percent = lambda value: '-' if math.isnan(value) else f'{100 * value:.2f}'  # noqa: E731
    for name, scores in result['per_class'].items():
        table.add_row(name, percent(scores['IoU']), percent(scores['Acc']))
    table.add_section()
    table.add_row(*(Text(cell, style='bold') for cell in ('mean', percent(result['mIoU']), percent(result['mAcc']))))
    table.add_row('all pixels (aAcc)', '', percent(result['aAcc']))
    output = console()
    output.print(table)
    output.print(f'mIoU {percent(result["mIoU"])}  mAcc {percent(result["mAcc"])}  aAcc {percent(result["aAcc"])}'
                  f'  (per-class CSV: {csv_path})')


@seg_app.command()
def predict(
        images: List[str] = typer.Argument(..., help='Image or video files, folders (every image below them) or quoted '
                                                     "patterns such as 'photos/**/*.jpg'."),
        frame_stride: int = typer.Option(1, min=1, help='Videos among the inputs (.mp4, .mov, ...): every Nth frame.'),
        checkpoint: Path = typer.Option(..., help='Run directory (its best checkpoint) or a checkpoint file.'),
        out: Path = typer.Option(Path('seg_predictions'), help='Output folder.'),
        overwrite: bool = typer.Option(False, help='Replace output files that exist.'),
        short_side: Optional[int] = typer.Option(None, min=32, help='Test scale. (default: the run\'s)'),
        slide: bool = typer.Option(False, help=SLIDE_HELP),
        window: Optional[int] = typer.Option(None, min=32, help='Sliding-window side. (default: the run\'s crop size)'),
        flip: bool = typer.Option(False, help='Average with the horizontally flipped image.'),
        alpha: float = typer.Option(0.5, min=0.0, max=1.0, help='Opacity of the colours in the overlay.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N.'),
        amp: AmpOption = 'none',
        json_out: bool = typer.Option(False, '--json', help='Print one JSON list instead of a table.'),
):
    """Segment images: per image <stem>_labels.png (class indices, single-channel), <stem>_mask.png (the same
    indices as a colour-palette PNG) and <stem>_overlay.png (the colours over the photo, with a legend); and
    predictions.json, one entry per image (what --json prints)."""
    from ..data.images import find_images
    from ..fileio import write_text_atomic
    from ..tasks.predictor import checked_batches, unique_stems
    from ..tasks.segmentation import Segmentation, SegmentationTask
    files = find_images(images, frame_stride)
    stems = unique_stems(files)
    check_output_folder(out)
    check_outputs([*(path for stem in stems for path in Segmentation.files(out, stem).values()),
                   out / 'predictions.json'], overwrite)
    predictor = SegmentationTask.load(checkpoint, device, short_side=short_side, slide=slide, window=window,
                                      amp=amp)
    results, names = [], iter(stems)
    # every image is read before anything is written; then a few at a time, so that a folder fits in memory
    for batch in checked_batches(files, 8, progress=not json_out, check=predictor.check_input):
        for segmentation in predictor.predict(batch, flip=flip):
            written = segmentation.save(out, next(names), alpha)
            summary = segmentation.to_dict()
            results.append(dict(image=summary['image'], size=summary['size'], labels=str(written['labels']),
                                mask=str(written['mask']), overlay=str(written['overlay']),
                                classes=summary['classes']))
    write_text_atomic(out / 'predictions.json', json.dumps(results, indent=1))
    if json_out:
        print(json.dumps(results))
        return
    table = Table(title=f'predictions of {checkpoint} in {out}')
    for column in ('image', 'size', 'labels', 'mask', 'overlay', 'largest classes'):
        table.add_column(column)
    for r in results:
        table.add_row(r['image'], 'x'.join(map(str, r['size'])), Path(r['labels']).name, Path(r['mask']).name,
                      Path(r['overlay']).name,
                      ', '.join(f'{name} {100 * share:.0f}%' for name, share in r['classes'].items()))
    console().print(table)
