"""``hatnet det train | eval | predict``: RetinaNet and Mask R-CNN on COCO-format data."""
import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import det_app

ARCH_HELP = 'retinanet (object detection) or maskrcnn (instance segmentation).'
CHECKPOINT_HELP = 'Run directory (its best checkpoint) or checkpoint file.'


@det_app.command('train')
def train_cmd(
        arch: Optional[str] = typer.Option(None, help=ARCH_HELP + ' [default: retinanet]'),
        data: Optional[Path] = typer.Option(None, help='Dataset folder in the COCO 2017 layout.'),
        model: Optional[str] = typer.Option(
            None, help='Backbone: a hat_net variant or any timm model. [default: hat_net_tiny]'),
        out: Optional[Path] = typer.Option(None, help='Run directory.'),
        recipe: Optional[str] = typer.Option(None, help='Recipe file or bundled name. [default: coco_ARCH_1x]'),
        epochs: Optional[int] = typer.Option(None, help="Train for N epochs (the recipe's lr steps scale along)."),
        iters: Optional[int] = typer.Option(
            None, help="Train for N optimiser steps (the recipe's lr steps scale along)."),
        batch_size: Optional[int] = typer.Option(None, help='Images per step and process.'),
        lr: Optional[float] = typer.Option(None, help='Learning rate.'),
        min_size: Optional[int] = typer.Option(None, help='Shorter image side. [default: 800]'),
        max_size: Optional[int] = typer.Option(None, help='Cap on the longer image side. [default: 1333]'),
        multi_scale: Optional[str] = typer.Option(
            None, help='Training: shorter sides to draw from, e.g. 640,672,704,736,768,800.'),
        pretrained: Optional[Path] = typer.Option(
            None, help='ImageNet checkpoint for the backbone (original .pth or .safetensors).'),
        frozen_stages: Optional[int] = typer.Option(None, help='Freeze the backbone stem and first N stages.'),
        train_split: Optional[str] = typer.Option(None, help='Training split name. [default: train2017]'),
        val_split: Optional[str] = typer.Option(None, help='Validation split name. [default: val2017]'),
        workers: Optional[int] = typer.Option(None, help='Data-loading processes.'),
        threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads per process (0: PyTorch's default)."),
        amp: Optional[str] = typer.Option(None, help='none | bf16 | fp16 (CUDA).'),
        eval_every: Optional[int] = typer.Option(None, help='Evaluate every N epochs (iteration runs: steps).'),
        seed: Optional[int] = typer.Option(None, help='Random seed.'),
        device: Optional[str] = typer.Option(None, help='auto | cpu | cuda | cuda:N'),
        resume: bool = typer.Option(False, '--resume', help='Continue the run in --out.'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace the run in --out.'),
):
    """Train RetinaNet or Mask R-CNN with a HAT-Net backbone (PVT's 1x COCO recipe by default)."""
    from ..engine import train
    from ..tasks.detection import DetectionTask, detection_configs

    options = dict(
        arch=arch, data=str(data) if data else None, model=model, out=str(out) if out else None, epochs=epochs,
        iters=iters, batch_size=batch_size, lr=lr, min_size=min_size, max_size=max_size,
        multi_scale=_int_list(multi_scale, '--multi-scale'), pretrained=str(pretrained) if pretrained else None,
        frozen_stages=frozen_stages, train_split=train_split, val_split=val_split, workers=workers, threads=threads,
        amp=amp, eval_every=eval_every, seed=seed, device=device, resume=resume or None, overwrite=overwrite or None)
    train_cfg, task_cfg = detection_configs(options, recipe)
    train(DetectionTask(task_cfg), train_cfg)


@det_app.command('eval')
def eval_cmd(
        data: Path = typer.Option(..., help='Dataset folder in the COCO 2017 layout.'),
        checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
        val_split: Optional[str] = typer.Option(None, help="Split to evaluate. [default: the run's val split]"),
        batch_size: int = typer.Option(2, help='Images per forward pass.'),
        workers: int = typer.Option(2, help='Data-loading processes.'),
        min_size: Optional[int] = typer.Option(None, help="Shorter image side. [default: the run's]"),
        max_size: Optional[int] = typer.Option(None, help="Cap on the longer side. [default: the run's]"),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N'),
        as_json: bool = typer.Option(False, '--json', help='Print one JSON object instead of a table.'),
        csv: Optional[Path] = typer.Option(None, help='Also write the metrics to this CSV file.'),
        results: Optional[Path] = typer.Option(None, help='Also write the detections as a COCO results json.'),
):
    """COCO bbox (and, for Mask R-CNN, segm) AP / AP50 / AP75 / APs / APm / APl of a trained detector."""
    from ..tasks.detection import evaluate_checkpoint, write_csv, write_json

    metrics, detections = evaluate_checkpoint(checkpoint, data, val_split, batch_size=batch_size, workers=workers,
                                              device=device, min_size=min_size, max_size=max_size)
    if results:
        write_json(detections, results)
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
    Console().print(table)


@det_app.command('predict')
def predict_cmd(
        images: List[Path] = typer.Argument(..., help='Image files.'),
        checkpoint: Path = typer.Option(..., help=CHECKPOINT_HELP),
        out: Path = typer.Option(Path('predictions'), help='Folder for the drawn PNGs and predictions.json.'),
        score_thresh: float = typer.Option(0.5, help='Keep detections scoring at least this.'),
        max_detections: int = typer.Option(100, help='Keep at most this many detections per image.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N'),
):
    """Detect objects in images: PNGs with boxes, class names, scores (and masks) drawn, plus a json."""
    from ..tasks.detection import predict_images

    written = predict_images(images, checkpoint, out, score_thresh=score_thresh, detections_per_img=max_detections,
                             device=device)
    Console().print(f'wrote {len(written)} image(s) and {out / "predictions.json"}')


def _int_list(text: Optional[str], option: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise typer.BadParameter(f'expected comma-separated integers, got {text!r}', param_hint=option) from None
