"""``hatnet eval / predict / attention / demo``: image classification."""
import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..engine.run_dir import check_output_folder, check_outputs
from ..errors import HatNetError
from ..fileio import write_csv_atomic
from .app import app, console as output_console
from .options import AmpOption

EVAL_REPORT = ('confusion_matrix.png', 'per_class.csv')  # what the eval command and the demo write


def _evaluation_report(result, out_dir: Path, title: str):
    """Write confusion_matrix.png and per_class.csv of an evaluation to out_dir; return (report dict, per-class
    rows)."""
    import torch

    from ..tasks.classification import per_class_accuracy, plot_confusion_matrix

    confusion_png, per_class_csv = (out_dir / name for name in EVAL_REPORT)
    confusion, names = torch.tensor(result['confusion'], dtype=torch.float64), result['class_names']
    plot_confusion_matrix(confusion, names, confusion_png, title)
    counts = confusion.sum(1).long().tolist()
    rows = [(name, n, None if n == 0 else float(a)) for name, n, a in zip(names, counts, per_class_accuracy(confusion))]
    write_csv_atomic(per_class_csv, ['class', 'images', 'accuracy'],
                     [[name, n, '' if a is None else f'{a:.6f}'] for name, n, a in rows])
    report = {k: v for k, v in result.items() if k not in ('class_names', 'confusion')}
    report.update(confusion_matrix=str(confusion_png), per_class_csv=str(per_class_csv))
    return report, rows


def _print_report(console: Console, report: dict, rows, max_rows: int = 30):
    summary = Table(title=report.get('title', 'evaluation'))
    for column in ('images', 'top-1', 'top-5', 'mean class accuracy', 'loss'):
        summary.add_column(column, justify='right')
    summary.add_row(f'{report["images"]:,}', f'{100 * report["top1"]:.2f} %', f'{100 * report["top5"]:.2f} %',
                    f'{100 * report["mean_class_acc"]:.2f} %', f'{report["loss"]:.4f}')
    console.print(summary)
    present = sorted((r for r in rows if r[1] > 0), key=lambda r: r[2])
    table = Table(title='per-class accuracy' + (f' (the {max_rows} lowest)' if len(present) > max_rows else ''))
    for column in ('class', 'images', 'accuracy'):
        table.add_column(column, justify='left' if column == 'class' else 'right')
    for name, n, acc in present[:max_rows]:
        table.add_row(name, str(n), f'{100 * acc:.1f} %')
    console.print(table)
    console.print(f'confusion matrix: {report["confusion_matrix"]}, per-class CSV: {report["per_class_csv"]}')


@app.command('eval')
def evaluate(
        checkpoint: Path = typer.Option(..., help='Run directory (its best checkpoint), checkpoint file, or an '
                                                  'original HAT-Net .pth / .safetensors.'),
        data: Optional[str] = typer.Option(None, help="ImageFolder root or 'digits' (default: the run's data)."),
        split: str = typer.Option('val', help='Split folder to evaluate.'),
        model: Optional[str] = typer.Option(None, help='Model name, for weights files of non-HAT-Net models.'),
        img_size: Optional[int] = typer.Option(None, help="(default: the checkpoint's)"),
        batch_size: int = typer.Option(64, min=1),
        workers: int = typer.Option(2, min=0),
        out: Optional[Path] = typer.Option(None, help='Folder for confusion_matrix.png and per_class.csv '
                                                      '(default: RUN/eval-DATA-SPLIT for a run directory, '
                                                      'else ./eval).'),
        overwrite: bool = typer.Option(False, help='Replace the report files in --out if they exist.'),
        json_output: bool = typer.Option(False, '--json', help='Print one JSON object (top1, top5 as fractions).'),
        device: str = typer.Option('auto', help='auto | cpu | cuda.'),
        amp: AmpOption = 'none',
):
    """Top-1 / top-5, per-class accuracy and a confusion-matrix PNG (timm eval transform: resize, centre crop)."""
    from ..tasks.classification import ClassificationTask

    predictor = ClassificationTask.load(checkpoint, device, model=model, img_size=img_size, amp=amp)
    data = data or predictor.trained_data
    if not data:
        raise HatNetError(f'give --data: {checkpoint} does not say which data it was trained on')
    run_report = checkpoint / f'eval-{Path(data).name}-{split}' if checkpoint.is_dir() else None
    out = out or run_report or Path('eval')
    if out != run_report:  # the run's own report is refreshed; files anywhere else are the user's
        check_outputs([out / name for name in EVAL_REPORT], overwrite)
    result = predictor.evaluate(data, split, batch_size=batch_size, workers=workers)
    title = f'{predictor.model_name} on {data}/{split}'
    report, rows = _evaluation_report(result, out, title)
    if json_output:
        print(json.dumps(report))
    else:
        _print_report(output_console(), dict(report, title=title), rows)


@app.command('predict')
def predict_command(
        images: List[str] = typer.Argument(..., help='Image or video files, folders (every image below them) or quoted '
                                                     "patterns such as 'photos/**/*.jpg'."),
        frame_stride: int = typer.Option(1, min=1, help='Videos among the inputs (.mp4, .mov, ...): every Nth frame.'),
        checkpoint: Path = typer.Option(..., help='Run directory, checkpoint file, or original HAT-Net .pth.'),
        model: Optional[str] = typer.Option(None, help='Model name, for weights files of non-HAT-Net models.'),
        top_k: int = typer.Option(5, min=1, help='Classes per image.'),
        img_size: Optional[int] = typer.Option(None, help="(default: the checkpoint's)"),
        out: Optional[Path] = typer.Option(None, help='Also write predictions.csv and a picture per image (the image '
                                                      'with its top-k bars) to this folder.'),
        overwrite: bool = typer.Option(False, help='Replace files in --out that exist.'),
        batch_size: int = typer.Option(32, min=1, help='Images per forward pass.'),
        json_output: bool = typer.Option(False, '--json', help='Print JSON instead of a table.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda.'),
        amp: AmpOption = 'none',
):
    """Top-k classes with names for each image (dataset names from our checkpoints, ImageNet names offline)."""
    from ..data.images import find_images
    from ..fileio import atomic_write
    from ..tasks.classification import ClassificationTask
    from ..tasks.predictor import checked_batches, unique_stems

    files = find_images(images, frame_stride)
    names = unique_stems(files)
    if out is not None:
        check_output_folder(out)
        check_outputs([out / 'predictions.csv', *(out / f'{name}.png' for name in names)], overwrite)
    predictor = ClassificationTask.load(checkpoint, device, model=model, img_size=img_size, amp=amp)
    results, pictures = [], iter(names)
    for batch in checked_batches(files, batch_size, progress=not json_output):
        for result in predictor.predict(batch, top_k=top_k, batch_size=batch_size):
            results.append(result)
            if out is not None:
                drawn = result.draw()
                atomic_write(out / f'{next(pictures)}.png', lambda tmp: drawn.save(tmp, format='PNG'))
    if out is not None:
        write_csv_atomic(out / 'predictions.csv', ['image', 'rank', 'class', 'index', 'probability'],
                         [[r.image, rank, name, i, f'{p:.6f}'] for r in results
                          for rank, (i, name, p) in enumerate(zip(r.indices, r.labels, r.scores), 1)])
    if json_output:
        print(json.dumps([r.to_dict() for r in results]))
        return
    table = Table(title=f'{predictor.model_name}: top-{top_k}' + (f' (pictures and predictions.csv in {out})'
                                                                    if out is not None else ''))
    for column in ('image', 'rank', 'class', 'probability'):
        table.add_column(column, justify='right' if column in ('rank', 'probability') else 'left')
    for r in results:
        for rank, (i, name, p) in enumerate(zip(r.indices, r.labels, r.scores), 1):
            table.add_row(r.image if rank == 1 else '', str(rank), Text.assemble(name, (f' ({i})', 'dim')),
                          f'{100 * p:.2f} %', end_section=rank == len(r.indices))
    output_console().print(table)


@app.command()
def attention(
        image: Path = typer.Argument(..., help='Image file.'),
        checkpoint: Path = typer.Option(..., help='Run directory, checkpoint file, or original HAT-Net .pth.'),
        block: str = typer.Option('0.0', help='STAGE.BLOCK, e.g. 1.0 for the first block of the second stage.'),
        query: Optional[str] = typer.Option(None, help='X,Y pixel of the (resized, cropped) model input that asks '
                                                       '(default: the centre).'),
        out: Path = typer.Option(Path('attention.png'), help='Output PNG.'),
        overwrite: bool = typer.Option(False, help='Replace --out if it exists.'),
        model: Optional[str] = typer.Option(None, help='Model name, for weights files.'),
        img_size: Optional[int] = typer.Option(None, help="(default: the checkpoint's)"),
        device: str = typer.Option('auto', help='auto | cpu | cuda.'),
):
    """Where one query location looks in an H-MHSA block: the local (grid) step and the global (pooled) step."""
    import numpy as np

    from ..data.images import read_image
    from ..tasks.attention import attention_blocks, attention_probabilities, plot_attention
    from ..tasks.classification import ClassificationTask

    check_outputs([out], overwrite)
    picture = read_image(image)
    predictor = ClassificationTask.load(checkpoint, device, model=model, img_size=img_size)
    blocks = attention_blocks(predictor.model)
    try:
        stage, index = (int(v) for v in block.split('.'))
    except ValueError:
        raise HatNetError(f'--block must be STAGE.BLOCK, e.g. 0.1; got {block!r}') from None
    if (stage, index) not in blocks:
        depths = [sum(1 for s, _ in blocks if s == i) for i in range(blocks[-1][0] + 1)]
        raise HatNetError(f'--block {block}: the model has {len(depths)} stages with {depths} blocks (0-based)')
    tensor = predictor.transform(picture)
    height, width = tensor.shape[-2:]
    try:
        x, y = (float(v) for v in query.split(',')) if query else ((width - 1) / 2, (height - 1) / 2)
    except ValueError:
        raise HatNetError(f'--query must be X,Y in pixels, got {query!r}') from None
    if not (0 <= x < width and 0 <= y < height):
        raise HatNetError(f'--query {query} is outside the {width}x{height} model input')

    result = attention_probabilities(predictor.model, tensor, stage, index, (x, y))
    mean = np.array(predictor.data_config['mean'])[:, None, None]
    std = np.array(predictor.data_config['std'])[:, None, None]
    picture = np.clip(tensor.numpy() * std + mean, 0, 1).transpose(1, 2, 0)
    rows, cols = result['map_size']
    plot_attention(picture, result, out, f'{predictor.model_name} stage {stage} block {index}: query token '
                                         f'{result["query"]} of {rows}x{cols} (mean over the heads)')
    output_console().print(f'wrote {out}')


def _fresh_dir(base: Path) -> Path:
    """base, or base-2, base-3, ... : the first that does not exist yet."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f'{base.name}-{n}')
    return candidate


@app.command()
def demo(
        out: Optional[Path] = typer.Option(None, help='Run directory (default: ./hatnet-demo, -2, -3, ... if taken).'),
        epochs: Optional[int] = typer.Option(None, help='(default: the digits recipe\'s)'),
        device: str = typer.Option('auto', help='auto | cpu | cuda.'),
):
    """Train HAT-Net-Tiny on the embedded handwritten digits (a few minutes on a CPU, no download)."""
    from ..engine import resolve_config, train as run_training
    from ..tasks.classification import ClassificationConfig, ClassificationTask

    console = output_console()
    out = out or _fresh_dir(Path('hatnet-demo'))
    train_cfg, task_cfg = resolve_config(
        ClassificationConfig, dict(out=str(out), epochs=epochs, device=device, data='digits', model='hat_net_tiny'),
        recipe='digits')
    console.print(Text.assemble(('hatnet demo', 'bold'), f': {task_cfg.model} on the embedded handwritten digits '
                                f'(1,437 training / 360 validation images, {task_cfg.img_size} px), '
                                f'{train_cfg.epochs} epochs'))
    start = time.time()
    result = run_training(ClassificationTask(task_cfg), train_cfg)
    minutes = (time.time() - start) / 60
    metrics = ClassificationTask.load(out, device).evaluate('digits', 'val', workers=0)
    _evaluation_report(metrics, out, 'hat_net_tiny on the digits (validation)')
    console.print(Text.assemble('\nvalidation accuracy ', (f'{100 * metrics["top1"]:.2f} %', 'bold green'),
                                f' (best checkpoint, step {result["best"]["step"]}) after {minutes:.1f} min of '
                                f'training'))
    console.print(f'curves: {out / "curves.png"}, confusion matrix: {out / "confusion_matrix.png"}, '
                  f'metrics: {out / "metrics.csv"}')
