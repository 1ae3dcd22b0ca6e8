"""Data loading that makes a resumed run see exactly the batches an uninterrupted run would.

* :class:`ResumableSampler` shuffles each epoch from ``seed + epoch`` (torch's DistributedSampler) and can
  start part-way through an epoch, so a resumed run skips the batches already consumed without loading them.
  It yields ``(epoch, index)`` pairs: the epoch travels with each index, so persistent workers need no update.
* :class:`SeededDataset` seeds the random number generators from ``(seed, epoch, index)`` before each sample's
  augmentation, so a sample is augmented the same way whichever worker loads it and whenever.
* :class:`ShardSampler` splits the validation set across processes without the padding DistributedSampler
  adds, so metrics summed over processes count every image exactly once.
"""
import itertools
import random
import re
from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np
import torch
from timm.utils import random_seed
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info

from ..errors import HatNetError


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded across processes, drops the tail; ``set_epoch(epoch, start)`` skips this process's
    first ``start`` samples of that epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((self.epoch, index) for index in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every sample on exactly one process, in order."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Wraps a training dataset, indexed by ``(epoch, index)`` pairs (``ResumableSampler``'s): sample ``index``
    of epoch ``epoch`` is drawn with the python, numpy and torch generators seeded from ``(seed, epoch, index)``.
    In the main process (``workers: 0``) the generators' previous states are restored afterwards, so data
    loading does not shift the training randomness."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, epoch_and_index: Tuple[int, int]):
        epoch, index = epoch_and_index
        in_worker = get_worker_info() is not None
        if not in_worker:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random_seed(_sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            if not in_worker:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


@contextmanager
def worker_errors_unwrapped():
    """Re-raise a hatnet error that a DataLoader worker raised with its own one-line message.

    DataLoader workers re-raise in the main process with the worker's whole traceback as the message; the
    original message is the traceback's last line, after the error's class name.
    """
    try:
        yield
    except HatNetError as e:
        message = worker_message(e)
        if message != str(e):
            raise type(e)(message) from None
        raise


def worker_message(error: Exception) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in its traceback."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return re.sub(rf'^[\w.]*{type(error).__name__}: ', '', lines[-1])
    return str(error)
