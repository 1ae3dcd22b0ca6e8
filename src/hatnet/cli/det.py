"""``hatnet det eval | predict | shapes``: RetinaNet and Mask R-CNN on COCO-format data."""
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..engine.run_dir import check_output_folder, check_outputs
from .app import console, det_app
from .options import (AmpOption, ShapesMax, ShapesMaxSize, ShapesMinSize, ShapesOut, ShapesSeed, ShapesTrain, ShapesVal,
                      check_new_dataset_folder)

CHECKPOINT_HELP = 'Run directory (its best checkpoint) or checkpoint file.'


@det_app.command()
def shapes(
        out: ShapesOut,
        train: ShapesTrain = 300,
        val: ShapesVal = 60,
        min_size: ShapesMinSize = 96,
        max_size: ShapesMaxSize = 128,
        max_shapes: ShapesMax = 3,
        seed: ShapesSeed = 0,
):
    """Write a synthetic COCO-2017-layout dataset to try detection offline: 1-3 circles, squares and triangles
    per image, each in a random colour, size and rotation on a random noisy background (only geometry tells the
    classes apart), some overlapping; boxes and RLE masks of their visible parts."""
    from ..data.detection import write_shapes_dataset
    check_new_dataset_folder(out, min_size, max_size)
    write_shapes_dataset(out, train, val, size=(min_size, max_size), seed=seed, max_shapes=max_shapes)
    console().print(f'wrote {train} training and {val} validation images (COCO 2017 layout) to {out}')


@det_app.command('eval')
def eval_cmd(
        data: Path = typer.Option(..., help='Dataset folder in the COCO 2017 layout.'),
        checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
        val_split: Optional[str] = typer.Option(None, help="Split to evaluate. [default: the run's val split]"),
        batch_size: int = typer.Option(2, min=1, help='Images per forward pass.'),
        workers: int = typer.Option(2, min=0, help='Data-loading processes.'),
        min_size: Optional[int] = typer.Option(None, min=32, help="Shorter image side. [default: the run's]"),
        max_size: Optional[int] = typer.Option(None, min=32, help="Cap on the longer side. [default: the run's]"),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N'),
        amp: AmpOption = 'none',
        as_json: bool = typer.Option(False, '--json', help='Print one JSON object instead of a table.'),
        csv: Optional[Path] = typer.Option(None, help='Also write the metrics to this CSV file.'),
        results: Optional[Path] = typer.Option(None, help='Also write the detections as a COCO results json.'),
        overwrite: bool = typer.Option(False, help='Replace the --csv and --results files if they exist.'),
):
    """COCO bbox (and, for Mask R-CNN, segm) AP / AP50 / AP75 / APs / APm / APl of a trained detector."""
    from ..tasks.detection import DetectionTask, write_csv

    check_outputs([path for path in (csv, results) if path is not None], overwrite)
    predictor = DetectionTask.load(checkpoint, device, min_size=min_size, max_size=max_size, amp=amp)
    metrics = predictor.evaluate(data, val_split, batch_size=batch_size, workers=workers, results_file=results)
    if csv:
        write_csv(metrics, csv)
    if as_json:
        print(json.dumps({k: None if math.isnan(v) else v for k, v in metrics.items()}))
        return
    table = Table(title=f'COCO metrics, {data} {val_split}')
    types = list(dict.fromkeys(k.split('_')[0] for k in metrics))
    table.add_column('')
    for iou_type in types:
        table.add_column(iou_type, justify='right')
    for stat in dict.fromkeys(k.split('_', 1)[1] for k in metrics):
        table.add_row(stat, *('-' if math.isnan(v) else f'{100 * v:.1f}' for v in
                              (metrics[f'{t}_{stat}'] for t in types)))
    console().print(table)


@det_app.command('predict')
def predict_cmd(
        images: List[str] = typer.Argument(..., help='Image or video files, folders (every image below them) or quoted '
                                                     "patterns such as 'photos/**/*.jpg'."),
        frame_stride: int = typer.Option(1, min=1, help='Videos among the inputs (.mp4, .mov, ...): every Nth frame.'),
        checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
        out: Path = typer.Option(Path('predictions'), help='Folder for the drawn PNGs and predictions.json.'),
        overwrite: bool = typer.Option(False, help='Replace output files that exist.'),
        score_thresh: float = typer.Option(0.5, min=0.0, max=1.0, help='Keep detections scoring at least this.'),
        max_detections: int = typer.Option(100, min=1, help='Keep at most this many detections per image.'),
        annotations: Optional[Path] = typer.Option(
            None, help='A COCO json listing the images: their image ids are taken from it (matched by file name). '
                       '[default: the images are numbered 1, 2, ... in the order given]'),
        results: Optional[Path] = typer.Option(None, help='Also write the detections as a COCO results json.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N'),
        amp: AmpOption = 'none',
):
    """Detect objects in images: PNGs with boxes, class names, scores (and masks) drawn, plus a json."""
    from ..data.images import find_images
    from ..fileio import atomic_write
    from ..tasks.detection import DetectionTask, image_ids_for, write_json
    from ..tasks.predictor import checked_batches, unique_stems

    files = find_images(images, frame_stride)
    drawings = [out / f'{stem}.png' for stem in unique_stems(files)]
    check_output_folder(out)
    check_outputs([*drawings, out / 'predictions.json', *([results] if results else [])], overwrite)
    image_ids = image_ids_for(files, annotations)
    predictor = DetectionTask.load(checkpoint, device, score_thresh=score_thresh, detections_per_img=max_detections,
                                   amp=amp)
    entries, coco, done = [], [], 0
    # every image is read (and checked) before anything is written; then a few at a time
    for batch in checked_batches(files, 8, check=predictor.check_input):
        for detection in predictor.predict(batch):
            png, image, image_id = drawings[done], files[done], image_ids[done]
            drawn = detection.draw()
            atomic_write(png, lambda tmp: drawn.save(tmp, format='PNG'))
            entry = detection.to_dict()
            entries.append(dict(image_id=image_id, file_name=image.name, image=entry['image'], drawing=str(png),
                                detections=entry['detections']))
            coco += detection.coco_results(image_id)
            done += 1
    write_json(entries, out / 'predictions.json')
    if results:
        write_json(coco, results)
    console().print(f'wrote {len(drawings)} image(s) and {out / "predictions.json"}'
                    + (f', {len(coco)} detections to {results}' if results else ''))
