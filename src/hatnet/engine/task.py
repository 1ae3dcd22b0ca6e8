"""The contract between the one trainer (``hatnet.engine``) and a task.

A task (classification, segmentation, detection) knows its data, model, loss and metrics; the trainer
owns everything else: device and DDP set-up, optimiser and schedule, bf16 autocast, gradient
accumulation and clipping, EMA, progress, logs, atomic checkpoints and exact resume.
"""
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


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

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on the CPU, with any pretrained weights already loaded."""

    @abstractmethod
    def build_datasets(self) -> Tuple[Dataset, Dataset]:
        """(train, validation) datasets. Validate paths and contents here and raise DatasetError."""

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
        evaluation and prediction (model name, number and names of classes, input size, ...)."""
        return {}
