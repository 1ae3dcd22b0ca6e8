"""``hatnet info`` and ``hatnet convert``."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app

EQUIVALENCE_TOLERANCE = 1e-4


@app.command()
def info(
        check: bool = typer.Option(True, help='Run the bundled equivalence self-check against the original code.'),
):
    """Table of the HAT-Net variants (parameters, GMACs at 224, published top-1) and an equivalence self-check."""
    import timm

    from ..complexity import count_macs
    from ..models import MODEL_NAMES
    from ..reference import self_check

    console = Console()
    table = Table(title='HAT-Net variants (224 x 224, 1000 classes)')
    for column in ('model', 'params', 'GMACs (layers, as in the paper)', 'GMACs (+ attention matmuls)',
                   'ImageNet top-1 (published)'):
        table.add_column(column, justify='left' if column == 'model' else 'right')
    for name in MODEL_NAMES:
        model = timm.create_model(name, device='meta')  # shapes only: no weights to draw for counting
        macs = count_macs(model)
        table.add_row(name, f'{sum(p.numel() for p in model.parameters()):,}', f'{macs["layers"] / 1e9:.2f}',
                      f'{macs["total"] / 1e9:.2f}', f'{model.pretrained_cfg["top1"]:.1f}')
    console.print(table)
    if not check:
        return

    results = self_check()
    table = Table(title=f'Equivalence with the original implementation (float32, tolerance {EQUIVALENCE_TOLERANCE:g})')
    for column in ('variant', 'input', 'weight seed', 'max |Δ logit|', 'result'):
        table.add_column(column)
    for r in results:
        ok = r['max_abs_diff'] <= EQUIVALENCE_TOLERANCE
        table.add_row(r['variant'], 'x'.join(map(str, r['input_shape'])), str(r['weight_seed']),
                      f'{r["max_abs_diff"]:.2e}', '[green]pass[/]' if ok else '[red]FAIL[/]')
    console.print(table)
    if any(r['max_abs_diff'] > EQUIVALENCE_TOLERANCE for r in results):
        raise typer.Exit(1)


@app.command()
def convert(
        src: Path = typer.Argument(..., help='Original HAT-Net .pth (or any hatnet checkpoint).'),
        dst: Path = typer.Argument(..., help='Output .safetensors file.'),
        model: Optional[str] = typer.Option(None, help='Variant name; recognised from the weights by default.'),
        overwrite: bool = typer.Option(False, help='Replace DST if it exists.'),
):
    """Convert a checkpoint to hatnet's layout as safetensors (loadable with pretrained_cfg_overlay=dict(file=...))."""
    from ..convert import convert_checkpoint
    variant = convert_checkpoint(src, dst, model_name=model, overwrite=overwrite)
    Console().print(f'wrote {dst} ({variant})')
