"""``hatnet export``: a model or any trained run to ONNX, checked against PyTorch with onnxruntime."""
from pathlib import Path
from typing import Optional

import typer

from ..engine.run_dir import check_outputs
from ..errors import HatNetError
from ..extras import require
from .app import app, console as output_console
from .options import comma_list

DEFAULT_CHECK_SIZES = {'detection': '224x288,97x65,333x250'}  # one image each; the others: 2 images each


def _target(model: str, checkpoint: Optional[Path], seg_output: str):
    """What to export: a model name (with weights from ``checkpoint``), or a run directory or checkpoint file."""
    import timm

    from ..export.runs import target_for_model, target_for_predictor
    from ..models.factory import create

    if timm.is_model(model) or not Path(model).exists():
        if seg_output != 'logits':
            raise HatNetError(f'--seg-output is for segmentation runs; {model} is a model name')
        return target_for_model(create(model, checkpoint).eval())
    if checkpoint is not None:
        raise HatNetError(f'{model} is a run or checkpoint file: give it alone, or a model name with --checkpoint')
    from .. import load
    predictor = load(model, device='cpu')
    if seg_output != 'logits' and predictor.task != 'segmentation':
        raise HatNetError(f'--seg-output is for segmentation runs; {model} is a {predictor.task} run')
    return target_for_predictor(predictor, seg_output)


@app.command()
def export(
        model: str = typer.Argument(..., help='Model name (e.g. hat_net_tiny), or a run directory or checkpoint '
                                              'file of any task (classification, segmentation, detection).'),
        onnx: Optional[Path] = typer.Option(None, '--onnx', help='Output .onnx file.'),
        hf: Optional[Path] = typer.Option(None, '--hf', help='Instead of ONNX: a Hugging Face-style folder of a '
                                                            'classification run (config.json with the class names, '
                                                            'model.safetensors, a model card) for timm and '
                                                            'transformers.'),
        checkpoint: Optional[Path] = typer.Option(None, help='Weights for a model name: an original HAT-Net .pth, a '
                                                             'hatnet .safetensors, a timm checkpoint or a '
                                                             'classification run.'),
        overwrite: bool = typer.Option(False, help='Replace --onnx (or --hf) if it exists.'),
        opset: int = typer.Option(18, help='ONNX opset (17 or newer).'),
        seg_output: str = typer.Option('logits', help='Segmentation runs: "logits" (batch, classes, H, W) or '
                                                      '"labels", the class index of each pixel (batch, H, W).'),
        check_size: Optional[str] = typer.Option(
            None, help='Sizes at which onnxruntime is compared with PyTorch (default: 224,250x333; detection: '
                       + DEFAULT_CHECK_SIZES['detection'] + ').'),
):
    """Export to ONNX with dynamic sizes (detectors: pre- and post-processing in the graph) and check it
    against PyTorch; or a classification run as a Hugging Face-style folder (--hf)."""
    if (onnx is None) == (hf is None):
        raise HatNetError('give one output: --onnx FILE or --hf FOLDER')
    if hf is not None:
        return _export_hf_folder(model, checkpoint, hf, overwrite)
    require('onnx', 'onnxruntime')
    from ..bench import parse_resolution
    from ..export.runs import SEG_OUTPUTS, check_export, write_onnx

    if seg_output not in SEG_OUTPUTS:
        raise HatNetError(f'unknown --seg-output {seg_output!r}: choose one of {", ".join(SEG_OUTPUTS)}')
    check_outputs([onnx], overwrite)
    explicit_sizes = [parse_resolution(s) for s in comma_list(check_size)] if check_size else None
    target = _target(model, checkpoint, seg_output)
    sizes = explicit_sizes or [parse_resolution(s) for s in
                               comma_list(DEFAULT_CHECK_SIZES.get(target.task, '224,250x333'))]
    console = output_console()
    with console.status(f'exporting {model}'):
        write_onnx(target, onnx, opset)
    check_export(target, onnx, sizes, console.print)
    shapes = 'one image of any size' if target.task == 'detection' else 'dynamic batch/height/width'
    console.print(f'wrote {onnx} ({target.task}, opset {opset}, {shapes})')


def _export_hf_folder(run: str, checkpoint: Optional[Path], folder: Path, overwrite: bool) -> None:
    from ..export.hf_folder import save_hf_folder

    if checkpoint is not None or not Path(run).exists():
        raise HatNetError(f'--hf writes a classification run: give its run directory or checkpoint file '
                          f'(not {run}{" with --checkpoint" if checkpoint else ""})')
    save_hf_folder(run, folder, overwrite)
    output_console().print(f'wrote {folder} (config.json, model.safetensors, README.md): '
                           f"timm.create_model('local-dir:{folder}', pretrained=True) after import hatnet")
