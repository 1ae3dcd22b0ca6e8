"""The contract between the one trainer (``hatnet.engine``) and a task.

A task (classification, segmentation, detection) knows its data, model, loss and metrics; the trainer
owns everything else: device and DDP set-up, optimiser and schedule, bf16 autocast, gradient
accumulation and clipping, EMA, progress, logs, atomic checkpoints and exact resume.

The trainer calls, in this order: ``build_datasets()`` (which may record what it found, e.g. the classes, as
attributes of the task), ``build_model()`` (which may use them: the number of classes comes from the data),
then ``train_step`` and ``evaluate`` for as long as the run lasts, and ``state()`` for every checkpoint.
Everything that can be wrong in the user's input is checked by the first two, before the run directory is
created.

A trained run comes back for inference through the task's ``load`` (or ``hatnet.load``, which picks the task
from the checkpoint): a :class:`~hatnet.tasks.predictor.Predictor` with ``predict(images)`` and
``evaluate(data)``.
"""
from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from ..tasks.predictor import Predictor


class Task(ABC):
    #: short name, used in logs and stored in checkpoints ('classification', 'segmentation', 'detection')
    name: str = ''
    #: key of ``evaluate()``'s result that selects the 'best' checkpoint (higher is better)
    primary_metric: str = ''
    #: collate function for both loaders (None = torch's default)
    collate_fn: Optional[Callable] = None
    #: the task's own settings (a dataclass; recipe keys that are not TrainConfig fields). The trainer writes
    #: them with its own to the run's config.yaml, which is how ``--resume`` rebuilds the task.
    config: Any = None
    #: names of the classes, in label order; set by ``build_datasets()``
    class_names: List[str] = []

    @abstractmethod
    def build_datasets(self) -> Tuple[Dataset, Dataset]:
        """(train, validation) datasets. Validate paths and contents here and raise DatasetError. Called first:
        record here what the model needs to know about the data (``class_names``, ...)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on the CPU, with any pretrained weights already loaded. Called after ``build_datasets``."""

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Move ``batch`` to ``device``, run the model in training mode, return (loss, scalars to log).

        ``model`` may be wrapped in DistributedDataParallel (call it, do not reach into it). Runs inside the
        trainer's autocast context; the trainer does backward, accumulation, clipping, stepping. The scalars
        (floats or 0-d tensors) are averaged per evaluation interval and logged as ``train_<name>``.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> Dict[str, float]:
        """Evaluate on ``loader`` (in distributed runs each rank sees its own shard, every sample exactly once).
        Every rank must return the same dict: reduce or gather across ranks with ``hatnet.engine.distributed``
        (``all_reduce_sum``, ``all_gather_object``). Runs in eval mode, under no_grad and autocast. The keys
        are logged as ``val_<name>`` (``val_ema_<name>`` for the EMA weights); higher ``primary_metric`` is better."""

    def state(self) -> Dict[str, Any]:
        """JSON-serialisable facts stored in every checkpoint (``task_state``), enough to rebuild the model for
        evaluation and prediction. One schema for every task: ``model`` (the backbone's timm name),
        ``class_names``, ``config`` (the task's settings as a dict), plus what the task needs besides, which a
        subclass adds to this dict (classification: ``num_classes``, ``data_config``; segmentation:
        ``ignore_index``, ``palette``; detection: ``category_ids``)."""
        config = asdict(self.config) if is_dataclass(self.config) else {}
        return dict(model=config.get('model'), class_names=list(self.class_names), config=config)

    @classmethod
    def load(cls, run_or_checkpoint, device: str = 'auto', **options) -> 'Predictor':
        """A trained model ready for inference: a run directory (its best checkpoint) or a checkpoint file of
        this task -> a :class:`~hatnet.tasks.predictor.Predictor` (``predict(images)``, ``evaluate(data)``).
        ``device``: auto | cpu | cuda | cuda:N; ``options``: the task's inference settings."""
        raise NotImplementedError(f'{cls.__name__} has no predictor')
