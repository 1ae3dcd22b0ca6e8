"""``hatnet det eval | predict``: RetinaNet and Mask R-CNN on COCO-format data."""
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..engine.run_dir import check_output_folder, check_outputs
from .app import console, det_app

CHECKPOINT_HELP = 'Run directory (its best checkpoint) or checkpoint file.'


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
        as_json: bool = typer.Option(False, '--json', help='Print one JSON object instead of a table.'),
        csv: Optional[Path] = typer.Option(None, help='Also write the metrics to this CSV file.'),
        results: Optional[Path] = typer.Option(None, help='Also write the detections as a COCO results json.'),
        overwrite: bool = typer.Option(False, help='Replace the --csv and --results files if they exist.'),
):
    """COCO bbox (and, for Mask R-CNN, segm) AP / AP50 / AP75 / APs / APm / APl of a trained detector."""
    from ..tasks.detection import DetectionTask, write_csv

    check_outputs([path for path in (csv, results) if path is not None], overwrite)
    predictor = DetectionTask.load(checkpoint, device, min_size=min_size, max_size=max_size)
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
        images: List[Path] = typer.Argument(..., help='Image files.'),
        checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
        out: Path = typer.Option(Path('predictions'), help='Folder for the drawn PNGs and predictions.json.'),
        overwrite: bool = typer.Option(False, help='Replace output files that exist.'),
        score_thresh: float = typer.Option(0.5, min=0.0, max=1.0, help='Keep detections scoring at least this.'),
        max_detections: int = typer.Option(100, min=1, help='Keep at most this many detections per image.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N'),
):
    """Detect objects in images: PNGs with boxes, class names, scores (and masks) drawn, plus a json."""
    from ..fileio import atomic_write
    from ..tasks.detection import DetectionTask, write_json
    from ..tasks.predictor import unique_stems

    drawings = [out / f'{stem}.png' for stem in unique_stems(images)]
    check_output_folder(out)
    check_outputs([*drawings, out / 'predictions.json'], overwrite)
    predictor = DetectionTask.load(checkpoint, device, score_thresh=score_thresh, detections_per_img=max_detections)
    entries = []
    for detection, png in zip(predictor.predict(images), drawings):  # every image is read before anything is written
        drawn = detection.draw()
        atomic_write(png, lambda tmp: drawn.save(tmp, format='PNG'))
        entry = detection.to_dict()
        entries.append(dict(image=entry['image'], drawing=str(png), detections=entry['detections']))
    write_json(entries, out / 'predictions.json')
    console().print(f'wrote {len(drawings)} image(s) and {out / "predictions.json"}')
