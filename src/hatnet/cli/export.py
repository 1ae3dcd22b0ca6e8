"""``hatnet export``: a model to ONNX, checked against PyTorch with onnxruntime."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..extras import require
from .app import app
from .options import comma_list


@app.command()
def export(
        model: str = typer.Argument(..., help='Model name, e.g. hat_net_tiny.'),
        onnx: Path = typer.Option(..., '--onnx', help='Output .onnx file.'),
        checkpoint: Optional[Path] = typer.Option(None, help='Weights: an original HAT-Net .pth, a hatnet '
                                                             '.safetensors, a timm checkpoint or a classification '
                                                             'run.'),
        opset: int = typer.Option(18, help='ONNX opset (17 or newer).'),
        check_size: str = typer.Option('224,250x333', help='Sizes at which onnxruntime is compared with PyTorch.'),
):
    """Export a model to ONNX with dynamic batch, height and width, and check it against PyTorch."""
    require('onnx', 'onnxruntime')
    import torch

    from ..bench import parse_resolution
    from ..export import OnnxRunner, export_onnx
    from ..models.factory import create

    sizes = [parse_resolution(s) for s in comma_list(check_size)]
    net = create(model, checkpoint).eval()
    console = Console()
    with console.status(f'exporting {model}'):
        export_onnx(net, onnx, opset=opset)
    runner = OnnxRunner(onnx)
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        images = torch.randn(2, getattr(net, 'in_chans', 3), *size, generator=generator)
        with torch.inference_mode():
            diff = (runner(images) - net(images)).abs().max().item()
        console.print(f'onnxruntime vs PyTorch at 2x{size[0]}x{size[1]}: max |Δ| {diff:.2e}')
    console.print(f'wrote {onnx} (opset {opset}, dynamic batch/height/width)')
