"""Export a timm model (hat_net or any other) to ONNX and run it with onnxruntime.

The graph is exported with ``torch.onnx.export(dynamo=True)`` and dynamic batch, height and width, so one
file serves every input size the model accepts (for hat_net: any size >= 32 x 32; the grid padding and its
attention mask are part of the graph).
"""
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint_io import _atomic_write
from ..errors import CheckpointError, HatNetError

DEFAULT_OPSET = 18
MIN_OPSET = 17


def load_model(name: str, checkpoint: Optional[os.PathLike] = None, **kwargs) -> torch.nn.Module:
    """timm.create_model in eval mode; ``checkpoint``: an original HAT-Net .pth or a hatnet .safetensors/.pth."""
    import timm

    from .. import models  # noqa: F401  (registers hat_net_* in timm)

    if not timm.is_model(name):
        raise HatNetError(f'unknown model {name!r} (hat_net_tiny, hat_net_small, ... or any timm model name)')
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise CheckpointError(f'checkpoint file not found: {checkpoint}')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    return timm.create_model(name, **kwargs).eval()


def export_onnx(
        model: torch.nn.Module,
        path: os.PathLike,
        opset: int = DEFAULT_OPSET,
        example_size: Sequence[int] = (224, 224),
) -> Path:
    """Write ``model`` (eval mode, float32, CPU) to ``path`` with dynamic batch, height and width.

    Input ``images`` (batch, channels, height, width), output ``output``. Written atomically.
    """
    import torch.export

    if opset < MIN_OPSET:
        raise HatNetError(f'opset {opset} is too old: the export needs opset >= {MIN_OPSET}')
    path = Path(path)
    model = model.eval().float().cpu()
    in_chans = getattr(model, 'in_chans', 3)
    # the example has batch 2: torch.export specialises dimensions of size 1
    example = torch.randn(2, in_chans, *example_size)
    dims = {0: torch.export.Dim('batch', min=1), 2: torch.export.Dim('height', min=32),
            3: torch.export.Dim('width', min=32)}
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=(dims,),
            input_names=['images'], output_names=['output'], verbose=False)
    _atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    return path


class OnnxRunner:
    """An onnxruntime session used like a module: ``runner(images) -> output`` on torch tensors."""

    def __init__(self, path: os.PathLike, threads: Optional[int] = None, memory_arena: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = memory_arena
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise HatNetError(f'cannot load ONNX model {path}: {str(e).splitlines()[0]}') from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu().contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: images.numpy()})[0])
