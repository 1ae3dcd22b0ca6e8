"""``hatnet export``: a model to ONNX, checked against PyTorch with onnxruntime."""
from pathlib import Path
from typing import Optional

import typer

from ..engine.run_dir import check_outputs
from ..errors import HatNetError
from ..extras import require
from .app import app, console as output_console
from .options import comma_list


def _model_to_export(model: str, checkpoint: Optional[Path]):
    """The network of a model name (with weights from ``checkpoint``), or of a run directory or checkpoint file."""
    import timm

    from ..models.factory import create

    if timm.is_model(model) or not Path(model).exists():
        return create(model, checkpoint).eval()
    if checkpoint is not None:
        raise HatNetError(f'{model} is a run or checkpoint file: give it alone, or a model name with --checkpoint')
    from .. import load
    predictor = load(model, device='cpu')
    if predictor.task == 'detection':
        raise HatNetError(f'{model} is a detection run: torchvision\'s detectors take lists of images and return '
                          f'dictionaries, which hatnet does not export to ONNX')
    return predictor.model


@app.command()
def export(
        model: str = typer.Argument(..., help='Model name (e.g. hat_net_tiny), or a classification or segmentation '
                                              'run directory or checkpoint file.'),
        onnx: Path = typer.Option(..., '--onnx', help='Output .onnx file.'),
        checkpoint: Optional[Path] = typer.Option(None, help='Weights for a model name: an original HAT-Net .pth, a '
                                                             'hatnet .safetensors, a timm checkpoint or a '
                                                             'classification run.'),
        overwrite: bool = typer.Option(False, help='Replace --onnx if it exists.'),
        opset: int = typer.Option(18, help='ONNX opset (17 or newer).'),
        check_size: str = typer.Option('224,250x333', help='Sizes at which onnxruntime is compared with PyTorch.'),
):
    """Export a model to ONNX with dynamic batch, height and width, and check it against PyTorch."""
    require('onnx', 'onnxruntime')
    import torch

    from ..bench import parse_resolution
    from ..export import OnnxRunner, export_onnx

    check_outputs([onnx], overwrite)
    sizes = [parse_resolution(s) for s in comma_list(check_size)]
    net = _model_to_export(model, checkpoint)
    console = output_console()
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
