"""What the predictors of all tasks share: their interface, image inputs, and reading a run back.

A predictor is what ``Task.load(run)`` (or ``hatnet.load(run)``) returns: a trained model in eval mode on its
device, with the run's class names, and two methods of the same shape for every task::

    predictor.predict(images, **options)   # -> a list of typed results, one per image
    predictor.evaluate(data, **options)    # -> a dict of metrics (what ``hatnet ... eval --json`` prints)

``amp='bf16'`` (or 'fp16') runs every forward pass of both under autocast, as ``hatnet train --amp`` trains:
on a CPU with bf16 instructions (AVX-512-BF16, AMX) and on CUDA, faster than float32 at slightly different
outputs (docs/performance.md measures both).

``images`` is one image or a list of them: file paths (str or Path), PIL images, numpy arrays (H, W, 3) of
uint8 or (H, W) grayscale; all are read (:func:`hatnet.data.images.read_image`) before any is predicted,
so one unreadable file fails the call before any work is done.
"""
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data.images import Frame, ImageSource, read_image
from ..engine.checkpoint import RunCheckpoint, load_run_checkpoint
from ..engine.distributed import resolve_device
from ..errors import CheckpointError, InputError
from ..models.runtime import EMULATED_BF16_NOTE, amp_autocast, check_amp, cpu_emulates_bf16, optimize_for_cpu

__all__ = ['ImageSource', 'Images', 'Prediction', 'Predictor', 'check_resized_size', 'checked_batches', 'read_inputs',
           'read_run', 'unique_stems']

Images = Union[ImageSource, Sequence[ImageSource]]


@dataclass
class Prediction:
    """What every typed result has: ``image``, the file it came from (None for an image given in memory), and
    the RGB input itself (``picture``, kept for results that draw on it)."""
    image: Optional[str]
    picture: Optional[Image.Image] = field(default=None, repr=False, compare=False, kw_only=True)

    def input_picture(self) -> Image.Image:
        """The RGB input, for drawing on."""
        if self.picture is None:
            raise InputError(f'{type(self).__name__} of {self.image or "an image"} was made without its input '
                             f'image; drawing on it needs one')
        return self.picture

    def to_dict(self) -> Dict[str, Any]:
        """The result as JSON-serialisable values (what the CLI's ``--json`` prints)."""
        raise NotImplementedError


class Predictor(ABC):
    """A trained model of one task, ready for inference: ``predict(images)`` and ``evaluate(data)``."""

    #: the task's name ('classification', 'segmentation', 'detection')
    task: str = ''

    def __init__(self, model: nn.Module, class_names: Sequence[str], device: Union[str, torch.device] = 'auto',
                 amp: str = 'none'):
        check_amp(amp)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.amp = amp  # 'none' (float32), 'bf16' or 'fp16': the autocast dtype of every forward pass
        if amp == 'bf16' and self.device.type == 'cpu' and cpu_emulates_bf16():
            warnings.warn(f"{EMULATED_BF16_NOTE}; amp 'none' is faster", stacklevel=2)
        # channels_last, as the trainer trains: the heads and decoders (and other backbones) compute in NHWC; a
        # model left NCHW took 1.3x the time of a Semantic FPN / UNet prediction in bf16 (docs/performance.md)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        if self.device.type == 'cpu':
            # HAT-Net's batch-sliced MLPs with fused SiLU: outputs equal within float32 rounding, faster on CPU
            optimize_for_cpu(self.model)
        self.class_names = list(class_names)

    def autocast(self):
        """The context of every forward pass of ``predict`` and ``evaluate``: autocast to ``amp``'s dtype."""
        return amp_autocast(self.amp, self.device)

    def check_input(self, source: Optional[str], picture: Image.Image) -> None:
        """Refuse an image this predictor cannot take (one InputError naming ``source``); ``predict`` checks
        every input before it predicts any, and the CLI before it writes anything."""

    @abstractmethod
    def predict(self, images: Images, **options) -> List[Prediction]:
        """One typed result per image (a dataclass with ``to_dict()``)."""

    @abstractmethod
    def evaluate(self, data, **options) -> Dict[str, Any]:
        """The metrics of the model on a dataset (a folder, or a name such as 'digits')."""

    def __repr__(self) -> str:
        amp = '' if self.amp == 'none' else f', amp={self.amp}'
        return (f'{type(self).__name__}({type(self.model).__name__}, {len(self.class_names)} classes, '
                f'device={self.device}{amp})')


def read_inputs(images: Images) -> List[Tuple[Optional[str], Image.Image]]:
    """(source, RGB image) for each input: the source is the file path, None for an image given in memory."""
    if isinstance(images, (str, Path, Frame, Image.Image, np.ndarray)):
        images = [images]
    return [(str(image) if isinstance(image, (str, Path, Frame)) else None, read_image(image)) for image in images]


def check_resized_size(inputs: Sequence[Tuple[Optional[str], Image.Image]], short_side: int, max_size: int,
                       min_side: int) -> None:
    """Refuse, before any is predicted, an image that resizing to a shorter side of ``short_side`` (the longer
    one at most ``max_size``) would leave with a side under ``min_side`` pixels: a very long, thin image."""
    for source, picture in inputs:
        width, height = picture.size
        scale = min(short_side / min(width, height), max_size / max(width, height))
        resized = int(width * scale), int(height * scale)
        if min(resized) < min_side:
            raise InputError(f'image {source or "(in memory)"} is {width}x{height}: at the model\'s scale (shorter '
                             f'side {short_side}, longer at most {max_size}) it would be {resized[0]}x{resized[1]}, '
                             f'under the {min_side} px the model needs')


def read_run(run_or_checkpoint, task: str, bare_weights: bool = False) -> RunCheckpoint:
    """The checkpoint of a ``task`` run: a run directory (its best checkpoint), a checkpoint file or an already
    read :class:`RunCheckpoint`. ``bare_weights``: also accept a weights file that is not a run's."""
    run = run_or_checkpoint if isinstance(run_or_checkpoint, RunCheckpoint) else \
        load_run_checkpoint(run_or_checkpoint, task=task)
    if run.task and run.task != task:
        raise CheckpointError(f'{run.path} is a {run.task} checkpoint, not a {task} one')
    if not run.task and not bare_weights:
        raise CheckpointError(f'{run.path} holds bare weights, not a {task} run; give the run directory of a '
                              f'{task} training run or one of its checkpoints')
    return run


def unique_stems(paths: Sequence[Union[str, Path, Frame]]) -> List[str]:
    """Names for the outputs of ``paths``: their stems, or, where two stems are equal (``a/cat.jpg``,
    ``b/cat.jpg``), the path below the inputs' common folder with ``_`` for the separators (``a_cat``)."""
    # a video frame is named as an image file beside its video would be: clip_000030
    paths = [(p.path.with_name(f'{p.stem}.png') if isinstance(p, Frame) else Path(p)).absolute() for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([p.parent for p in paths]))
    names = [p.stem if stems.count(p.stem) == 1 else '_'.join(p.relative_to(root).with_suffix('').parts)
             for p in paths]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InputError(f'two input images would both write outputs named {duplicate!r}; rename one')
    return names


def checked_batches(files: Sequence[Path], batch_size: int, progress: bool = True,
                    check: Optional[Callable[[str, Image.Image], None]] = None) -> Iterator[List[Path]]:
    """``files`` in batches for prediction, after every one has been read (and passed ``check``, e.g. a
    predictor's ``check_input``) once: a broken image anywhere stops the command, with one line naming it,
    before any output is written. Progress bars on stderr."""
    # the bars only on a terminal (tqdm's disable=None), where an error line that follows is still one line
    shown = None if progress and len(files) > 1 else True
    for path in tqdm(files, desc='reading', unit='image', disable=shown, leave=False):
        picture = read_image(path)
        if check is not None:
            check(str(path), picture)
    with tqdm(total=len(files), desc='predicting', unit='image', disable=shown) as bar:
        for start in range(0, len(files), batch_size):
            batch = list(files[start:start + batch_size])
            yield batch
            bar.update(len(batch))
