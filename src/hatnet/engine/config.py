"""Trainer settings and recipe files.

A recipe is a flat YAML mapping: keys that are :class:`TrainConfig` fields configure the trainer, the other
keys go to the task's own config; a key neither knows is an error. Command-line options override recipes.
"""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class TrainConfig:
    out: str = ''                   # run directory
    # length: exactly one of epochs / iters is > 0 (iters counts optimiser steps)
    epochs: int = 0
    iters: int = 0
    batch_size: int = 32            # per process
    accum_steps: int = 1            # gradient accumulation
    workers: int = 2
    # optimisation, built with timm's create_optimizer_v2 / create_scheduler_v2
    opt: str = 'adamw'
    lr: float = 1e-3
    lr_base_size: int = 0           # > 0: lr is scaled by (global batch * accum_steps) / lr_base_size
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    sched: str = 'cosine'           # cosine | poly | step | constant
    min_lr: float = 0.0
    warmup_epochs: float = 0.0      # epoch runs
    warmup_iters: int = 0           # iteration runs
    warmup_lr: float = 1e-6
    decay_milestones: List[int] = field(default_factory=list)  # 'step': epochs (or iters) where lr *= decay_rate
    decay_rate: float = 0.1
    poly_power: float = 0.9
    # numerics and speed
    amp: str = 'none'               # none | bf16
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 0
    device: str = 'auto'            # auto | cpu | cuda | cuda:N
    # bookkeeping
    eval_every: int = 1             # epochs for epoch runs, optimiser steps for iteration runs
    save_every: int = 0             # also write 'last' every N optimiser steps (0: only at evaluation points)
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
