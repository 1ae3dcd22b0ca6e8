"""Run checkpoints: what the trainer writes and how eval / predict read them back.

A run directory holds ``last.pth`` (the full training state, for ``--resume``) and ``best.pth`` (the weights
that scored best on the task's primary metric, plus what is needed to rebuild the model). Both are plain
dicts of tensors and Python values, written atomically and read with ``weights_only=True``:

=================  ====================================================================================
key                content
=================  ====================================================================================
``format``         ``'hatnet-run'``
``task``           the task's name (``'classification'``, ``'segmentation'``, ``'detection'``)
``task_state``     ``Task.state()``: model name, classes, input size, ...
``model``          the model's state_dict (in ``best.pth``: the best weights, the model's or the EMA's)
``weights``        ``best.pth``: ``'model'`` or ``'ema'``, where the best weights come from
``metrics``        the metrics row of the evaluation that wrote the file
``epoch, step``    position in the run
``config``         the run's flat settings (as in ``config.yaml``)
``last.pth`` only  ``optimizer``, ``scheduler`` (for reference: on resume the schedule is rebuilt from the
                   settings and the step), ``scaler``, ``ema``, ``batch_in_epoch``, ``batches_per_epoch``, ``best``,
                   ``history`` (all metrics rows), ``world_size`` and ``ranks`` (per process: RNG states
                   and the running sums of the current logging interval)
=================  ====================================================================================

A run directory means its best checkpoint (:func:`load_run_checkpoint`).
"""
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import RUN_BEST as BEST, RUN_FORMAT as FORMAT, RUN_LAST as LAST  # noqa: F401 (the engine's names)
from ..fileio import load_file, run_checkpoint_file, unwrap_state_dict
from ..models.weights import check_fits


def capture_rng_state() -> Dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states, as tensors and plain values."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        'python': [version, list(internal), gauss],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@dataclass
class RunCheckpoint:
    """Weights to evaluate or predict with, and what is known about them."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    task: str = ''                     # '' for a bare weights file (e.g. an original HAT-Net .pth)
    task_state: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)  # the run's flat settings (data, model, ...)


def load_run_checkpoint(path, task: str = '') -> RunCheckpoint:
    """Read a run directory (its ``best.pth``), one of our checkpoint files, or a bare weights file.

    ``task``: if given, a hatnet checkpoint written by another task is an error.
    """
    path = run_checkpoint_file(path)
    checkpoint = load_file(path)
    if not (isinstance(checkpoint, dict) and checkpoint.get('format') == FORMAT):
        return RunCheckpoint(path, unwrap_state_dict(checkpoint, source=str(path)))
    if task and checkpoint['task'] != task:
        raise CheckpointError(f'{path} is a {checkpoint["task"]} checkpoint, not a {task} one')
    return RunCheckpoint(path, checkpoint['model'], checkpoint['task'], checkpoint.get('task_state', {}),
                         checkpoint.get('metrics', {}), checkpoint.get('config', {}))


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """``model.load_state_dict(strict=True)`` with one CheckpointError that names the first mismatch
    (``hatnet.models.check_fits``)."""
    check_fits(state_dict, model, source=source)
    model.load_state_dict(state_dict)
