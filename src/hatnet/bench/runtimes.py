"""How a benchmarked model is run: eager PyTorch, torch.compile, or onnxruntime on an exported graph.

Every runtime turns a model into a callable ``run(images) -> output`` that already applies the dtype
(bf16 = autocast), memory-format and mode choices, so the timing loop treats them all alike. In ``train``
mode one call is a whole training step: forward, loss, backward and an AdamW step.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import HatNetError
from ..models import optimize_for_cpu
from ..models.runtime import amp_autocast

RUNTIMES = ('eager', 'compile', 'onnxruntime')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
MODES = ('infer', 'train')


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    dtype: str = 'fp32'
    channels_last: bool = False
    threads: Optional[int] = None
    mode: str = 'infer'


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
    # the bench's 'fp32' is the trainer's and the predictors' amp 'none'
    return amp_autocast('none' if settings.dtype == 'fp32' else settings.dtype, settings.device)


def training_loss(output) -> torch.Tensor:
    """A loss that reaches every output: cross-entropy of logits against fixed labels, or the mean square of
    each feature map of a ``features_only`` backbone (what a dense head's loss costs is not the backbone's)."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        labels = torch.arange(len(output), device=output.device) % output.shape[1]
        return F.cross_entropy(output.float(), labels)
    return sum(feature.float().square().mean() for feature in output)


def make_train_step(model: torch.nn.Module, runtime: str, settings: RunSettings):
    """A callable doing one training step of ``model`` on its images (forward, loss, backward, AdamW step)
    and returning the detached loss; the optimizer is the trainer's (``hatnet.engine.fast_optimizer_kwargs``)."""
    from ..engine.trainer import fast_optimizer_kwargs

    if runtime not in ('eager', 'compile'):
        raise HatNetError(f'{runtime} runs inference only; train mode needs eager or compile')
    model = model.to(settings.device).train()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fast_optimizer_kwargs(settings.device))
    forward = compile_model(model) if runtime == 'compile' else model

    def step(images: torch.Tensor) -> torch.Tensor:
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(settings):
            loss = training_loss(forward(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_runner(model: torch.nn.Module, runtime: str, settings: RunSettings, workdir: Optional[Path] = None):
    """A callable running ``model`` under ``runtime`` (eval mode; in ``train`` mode, one training step per
    call, see ``make_train_step``); raises HatNetError if unsupported.

    On CPU the eager and compile runtimes run hat_net models in their CPU inference form,
    ``hatnet.models.optimize_for_cpu`` (applied to ``model`` in place; a no-op for other models, and under
    torch.compile the graph runs the whole batch anyway).
    """
    if settings.mode == 'train':
        return make_train_step(model, runtime, settings)
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
