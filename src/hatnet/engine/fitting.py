"""The ``auto`` recipe: the paper's recipe, with what it cannot know derived from the user's data and machine.

A paper recipe is written for ADE20K / COCO on 8 GPUs. On a few hundred 128 px images and a 2-core CPU its
image scale, batch, schedule length, loader processes and norm are wrong, and a user cannot be expected to
know nine flags to fix them. With ``--recipe auto`` (the default of ``hatnet seg train`` and ``hatnet det
train``) the task's ``fit_recipe`` looks at the data (image sizes from the file headers, the number of
images) and the trainer at the device, and each returns :class:`Choice` s: a setting, its value and why.
Settings the user gave on the command line are never changed. The choices are printed at the start of the
run and written to ``config.yaml`` (values, and the reasons as comments), so a resumed run keeps them.
"""
import os
from typing import Any, Iterable, List, NamedTuple

import torch


class Choice(NamedTuple):
    """One setting the ``auto`` recipe chose: ``key`` (a TrainConfig or task config field), ``value``, ``why``."""
    key: str
    value: Any
    why: str


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def launched_processes(local: bool = False) -> int:
    """Training processes of the run, as torchrun announces them before any process group exists: all of them
    (``WORLD_SIZE``: the global batch), or those on this machine (``local``: its CPUs are shared by them)."""
    return int(os.environ.get('LOCAL_WORLD_SIZE' if local else 'WORLD_SIZE', '1'))


def machine_choices(train_cfg, device: torch.device, processes: int = 1) -> List[Choice]:
    """What the machine decides, for any task: loader processes from the CPUs left per training process."""
    cpus = max(1, cpu_count() // max(1, processes))
    # on CPU the training process uses every core for compute: more loader processes than cores left only
    # compete with it (PyTorch warns past the core count); on CUDA the CPUs are free to decode images
    workers = min(train_cfg.workers, cpus - 1 if device.type == 'cpu' else cpus)
    workers = max(0, workers)
    if workers == train_cfg.workers:
        return []
    return [Choice('workers', workers, f'{cpus} CPU(s) per training process on {device.type}')]


def apply_choices(train_cfg, task_cfg, choices: Iterable[Choice], given: Iterable[str]) -> List[Choice]:
    """Set each choice on the config that has its key, unless the user gave that key; the choices applied."""
    given, applied = set(given), []
    for choice in choices:
        if choice.key in given:
            continue
        target = train_cfg if hasattr(train_cfg, choice.key) else task_cfg
        if not hasattr(target, choice.key):
            raise KeyError(f'auto recipe chose unknown setting {choice.key!r}')
        if getattr(target, choice.key) != choice.value:
            setattr(target, choice.key, choice.value)
            applied.append(choice)
    return applied
