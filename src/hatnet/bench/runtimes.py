"""How a benchmarked model is run: eager PyTorch, torch.compile, or onnxruntime on an exported graph.

Every runtime turns a model into a callable ``run(images) -> output`` that already applies the dtype
(bf16 = autocast) and memory-format choices, so the timing loop treats them all alike.
"""
import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import HatNetError
from ..models import optimize_for_cpu

RUNTIMES = ('eager', 'compile', 'onnxruntime')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    dtype: str = 'fp32'
    channels_last: bool = False
    threads: Optional[int] = None


def compile_model(model: torch.nn.Module, **compile_kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile with the batch, height and width marked dynamic before the first call.

    The first call compiles one graph that serves every later input size, instead of one recompilation
    per new resolution.
    """
    compiled = torch.compile(model, **compile_kwargs)

    def run(images: torch.Tensor) -> torch.Tensor:
        # dimensions of size 1 are always specialised by dynamo; marking them would be an error
        torch._dynamo.maybe_mark_dynamic(images, [d for d in (0, 2, 3) if images.shape[d] > 1])
        return compiled(images)

    return run


def _autocast(settings: RunSettings):
    if settings.dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=DTYPES[settings.dtype])


def make_runner(model: torch.nn.Module, runtime: str, settings: RunSettings, workdir: Optional[Path] = None):
    """A callable running ``model`` (eval mode) under ``runtime``; raises HatNetError if unsupported.

    On CPU the eager and compile runtimes run hat_net models in their CPU inference form,
    ``hatnet.models.optimize_for_cpu`` (applied to ``model`` in place; a no-op for other models, and under
    torch.compile the graph runs the whole batch anyway).
    """
    if runtime == 'onnxruntime':
        from ..export import OnnxRunner, export_onnx
        if settings.device.type != 'cpu' or settings.dtype != 'fp32':
            raise HatNetError('onnxruntime is benchmarked on CPU in fp32 only')
        workdir = Path(workdir or tempfile.mkdtemp(prefix='hatnet-bench-'))
        path = export_onnx(model, workdir / f'{type(model).__name__}-{id(model)}.onnx')
        # no spin-waiting: idle onnxruntime threads would spin on the cores the next model is timed on
        return OnnxRunner(path, threads=settings.threads, spin_wait=False)
    if runtime not in ('eager', 'compile'):
        raise HatNetError(f'unknown runtime {runtime!r}, choose from {", ".join(RUNTIMES)}')
    model = model.to(settings.device)
    if settings.device.type == 'cpu':
        optimize_for_cpu(model)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = compile_model(model) if runtime == 'compile' else model

    def run(images: torch.Tensor) -> torch.Tensor:
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(settings):
            return forward(images)

    return run
