"""The one trainer: ``train(task, config)`` trains any :class:`~hatnet.engine.Task`.

API
---
::

    from hatnet.engine import Task, TrainConfig, train, resolve_config
    from hatnet.engine import load_run_checkpoint, load_weights, distributed

    train_cfg, task_cfg = resolve_config(MyTaskConfig, cli_options, recipe='paper', aliases={'paper': 'x'})
    result = train(MyTask(task_cfg), train_cfg)   # {'run_dir', 'metrics' (last row), 'best': {...}}

A task implements ``build_datasets``, ``build_model`` (called in this order: the model may use what the data
showed, e.g. the classes), ``train_step``, ``evaluate`` (see ``engine/task.py``); ``task.config`` (its
settings dataclass) is saved with the trainer's in ``config.yaml``. The trainer does the rest, identically
for every task:

* length: ``epochs`` (each epoch one pass over the shuffled training set, tail dropped) or ``iters``
  (optimiser steps, epochs wrap around); evaluation every ``eval_every`` epochs / steps and at the end.
* timm ``create_optimizer_v2`` (no weight decay on norms and biases, optional ``layer_decay``) and
  ``create_scheduler_v2`` stepped after every optimiser step; warm-up in epochs and/or steps; ``step``
  schedules decay at ``decay_milestones`` (epochs, or steps in iteration runs); ``lr_base_size`` scales lr
  by the global batch.
* bf16 autocast (CPU and CUDA), fp16 with a GradScaler (CUDA), gradient accumulation and clipping,
  timm ``ModelEmaV3`` (evaluated next to the model), channels_last, seeds.
* DDP under ``torchrun`` (env:// rendezvous, gloo on CPU, nccl on CUDA), a sharded sampler, metrics
  reduced by the task, only rank 0 writes files and prints.
* a progress bar per epoch (iteration runs: per evaluation interval) with img/s, loss, lr and ETA;
  ``metrics.csv`` (``step``, ``epoch``, ``lr``, ``train_*``, ``val_*``, ``val_ema_*``), TensorBoard when
  installed, ``curves.png``, ``log.txt``, ``config.yaml``.
* ``last.pth`` at every evaluation and every ``save_every`` steps, ``best.pth`` by ``task.primary_metric``,
  written atomically. ``resume`` continues a killed run to exactly the state an uninterrupted run reaches.
"""
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..fileio import append_text, load_file, save_atomic, write_text_atomic
from ..errors import CheckpointError, DatasetError, HatNetError
from ..models.runtime import (EMULATED_BF16_NOTE, amp_autocast, check_amp, cpu_emulates_bf16, flush_denormals,
                              keep_freed_memory)
from . import distributed as dist
from .checkpoint import BEST, FORMAT, LAST, capture_rng_state, load_weights, restore_rng_state
from .fitting import Choice
from .config import TRAIN_RANGES, TrainConfig, check_ranges, config_dict
from .loaders import ResumableSampler, SeededDataset, ShardSampler, worker_errors_unwrapped, worker_message
from .logs import CURVES_PNG, RunLog, plot_curves
from .run_dir import CONFIG_YAML, LOG_TXT, RunLock, check_start, prepare
from .task import Task

# settings a resumed run must keep: they decide which samples each step of an epoch takes
BATCH_SETTINGS = ('batch_size', 'accum_steps')


def train(task: Task, config: TrainConfig, choices: Sequence[Choice] = ()) -> Dict[str, Any]:
    """Run (or, with ``config.resume``, continue) a training run; returns ``{'run_dir', 'metrics', 'best'}``.

    ``choices``: the settings the ``auto`` recipe fitted to the data (already applied to the configs), printed
    at the start and written with their reasons to ``config.yaml``."""
    check_config(config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    # the run directory's lock is taken once data and model are built, and released however the run ends
    with dist.setup(config.device) as device, worker_errors_unwrapped(), RunLock(config.out) as lock:
        return Trainer(task, config, device, lock, choices).fit()


def check_config(cfg: TrainConfig) -> None:
    """Every trainer setting, checked before anything is built or written (one HatNetError for the first bad one)."""
    if not cfg.out:
        raise HatNetError('no run directory given (--out)')
    check_ranges(cfg, TRAIN_RANGES)
    if (cfg.epochs > 0) == (cfg.iters > 0):
        raise HatNetError(f'give exactly one of epochs and iters (got epochs={cfg.epochs}, iters={cfg.iters})')
    check_amp(cfg.amp)
    if cfg.sched == 'step' and not cfg.decay_milestones:
        raise HatNetError("sched 'step' needs decay_milestones (epochs, or steps in an iteration run)")
    if cfg.resume and cfg.overwrite:
        raise HatNetError('--resume and --overwrite contradict each other; pass one of them')
    # optimiser and schedule on a stand-in parameter: their names and values, as timm checks them (zeros: no
    # random initialisation, which would move the global generator before the run seeds it)
    stand_in = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))])
    optimizer = build_optimizer(stand_in, cfg, cfg.lr, layer_decay=False)
    build_scheduler(optimizer, cfg, steps_per_epoch=1, total_steps=max(cfg.iters, cfg.epochs))


# torch's own Adam and AdamW (timm names), whose update can run as one fused kernel per weight
FUSABLE_OPTIMIZERS = ('adam', 'adamw')


def fast_optimizer_kwargs(device: torch.device) -> Dict[str, Any]:
    """Arguments that make torch's Adam / AdamW fastest on ``device``: ``fused=True`` on CPU and CUDA runs the
    update of each weight in one kernel instead of a chain of element-wise passes over it and its two moments
    (the same update up to float rounding)."""
    return {'fused': True} if device.type in ('cpu', 'cuda') else {}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, layer_decay: bool = True):
    """timm's ``create_optimizer_v2`` with the run's settings; a bad name or value is one HatNetError."""
    device = next(model.parameters()).device
    fast = fast_optimizer_kwargs(device) if cfg.opt.lower() in FUSABLE_OPTIMIZERS else {}
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                   layer_decay=cfg.layer_decay if layer_decay else None, **fast)
    except (ValueError, TypeError, ImportError, AssertionError) as e:
        raise HatNetError(f'optimizer {cfg.opt!r}: {e}') from None


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """timm scheduler over optimiser steps (one scheduler 'epoch' = one step)."""
    per_epoch = steps_per_epoch if cfg.epochs else 1
    milestones = [m * per_epoch for m in cfg.decay_milestones]
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch) + cfg.warmup_iters
    sched = {'step': 'multistep'}.get(cfg.sched, cfg.sched)
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=total_steps, decay_milestones=milestones,
            decay_rate=cfg.poly_power if sched == 'poly' else cfg.decay_rate, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_epochs=warmup_steps, step_on_epochs=False, updates_per_epoch=1)
    except (ValueError, TypeError, AssertionError) as e:
        raise HatNetError(f'learning-rate schedule: {e}') from None
    if scheduler is None:
        raise HatNetError(f"sched {cfg.sched!r}: use cosine, poly, step, constant or another timm scheduler")
    return scheduler


class StepClock:
    """Times a few optimiser steps once the first of a session (loader start-up, allocation) is done, and
    says once how long the rest of the run's steps will take at that speed."""
    STEPS = 5

    def __init__(self, step: int, total_steps: int, device: torch.device):
        self.start_step, self.total_steps, self.device = step + 1, total_steps, device
        self.started = 0.

    def _now(self) -> float:
        if self.device.type == 'cuda':  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def tick(self, step: int) -> str:
        """After optimiser step ``step``: the estimate, once, when it has been measured; '' otherwise."""
        if step == self.start_step:
            self.started = self._now()
        elif step == self.start_step + self.STEPS and step < self.total_steps:
            per_step = (self._now() - self.started) / self.STEPS
            left = per_step * (self.total_steps - step)
            return (f'measured {per_step:.2f} s per step on {self.device.type}: the remaining '
                    f'{self.total_steps - step} steps take about {_duration(left)}')
        return ''


def _duration(seconds: float) -> str:
    """3725 -> '1 h 2 min', 95 -> '1.6 min', 12 -> '12 s'."""
    if seconds >= 3600:
        return f'{int(seconds // 3600)} h {round(seconds % 3600 / 60)} min'
    return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, device: torch.device, lock: RunLock,
                 choices: Sequence[Choice] = ()):
        self.task, self.cfg, self.device, self.choices = task, cfg, device, list(choices)
        self.run_dir = Path(cfg.out)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.main = dist.is_main_process()
        # refuse another run's directory, or one in use, before anything is built (checked on every process)
        check_start(self.run_dir, cfg.resume, cfg.overwrite)
        if device.type == 'cpu':  # process-wide settings, before data and model are built
            # subnormal values cost Intel cores a microcode assist per operation (steps 2.5-10x slower); the
            # operators that build data and model may start the worker threads, which inherit the mode
            flush_denormals()
            # a CPU step allocates and frees the same large activations every time: glibc would hand them back
            # to the OS and page-fault them in afresh each step (5-15 % of a step, docs/performance.md)
            keep_freed_memory()

        # the data first: the model may depend on it (the number of classes)
        train_set, val_set = task.build_datasets()
        self._build_loaders(train_set, val_set)
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        model = task.build_model()
        # only now, with data and model known to be good, is anything written
        self._prepare_run_dir(lock)

        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        global_batch = cfg.batch_size * self.world_size * cfg.accum_steps
        self.lr = cfg.lr * global_batch / cfg.lr_base_size if cfg.lr_base_size > 0 else cfg.lr
        self.optimizer = build_optimizer(model, cfg, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None

        # position: optimiser steps done, and micro-batches of the current epoch consumed
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []
        self.sums: Dict[str, float] = {}  # running sums of the train scalars since the last evaluation
        self.elapsed = 0.                  # training seconds before this session (resumed runs)
        self.session_start = time.time()
        if cfg.resume:
            self._load_last()
        else:  # python, numpy and torch generators: dropout, mixup, ... differ between processes
            random_seed(cfg.seed, self.rank)
        self.scheduler.step_update(self.step)

        self.ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None) if dist.is_distributed() else model
        if cfg.compile:  # the training forward only: evaluation and checkpoints use the plain model
            self.ddp_model = torch.compile(self.ddp_model)
        self.log = RunLog(self.run_dir, purge_step=self.step or None) if self.main else None
        if self.main:
            self._write_config()

    # ---------------------------------------------------------------- set-up
    def _build_loaders(self, train_set, val_set) -> None:
        cfg = self.cfg
        if len(train_set) < cfg.batch_size * self.world_size * cfg.accum_steps:
            raise DatasetError(f'the training set has {len(train_set)} samples, fewer than one optimiser step needs '
                               f'(batch size {cfg.batch_size} x {self.world_size} processes x {cfg.accum_steps} '
                               f'accumulation steps)')
        if len(val_set) == 0:
            raise DatasetError('the validation set is empty')
        self.train_set = SeededDataset(train_set, cfg.seed)
        self.train_sampler = ResumableSampler(self.train_set, self.world_size, self.rank, cfg.seed)
        common = dict(num_workers=cfg.workers, collate_fn=self.task.collate_fn,
                      pin_memory=self.device.type == 'cuda', generator=torch.Generator().manual_seed(cfg.seed))
        # workers live for the whole run: a worker forked later shares the trainer's grown heap copy-on-write,
        # and the next steps then fault every page they write once more (480 000-540 000 faults and ~14 s of
        # system time per fork on a 2-core VM); with fork, a late start also risks a deadlock in processes that
        # already run threads. The training samples' epoch comes with their indices (ResumableSampler).
        self.train_loader = DataLoader(
            self.train_set, batch_size=cfg.batch_size, sampler=self.train_sampler, drop_last=True,
            persistent_workers=cfg.workers > 0, **common)
        self.val_loader = DataLoader(
            val_set, batch_size=cfg.eval_batch_size or cfg.batch_size,
            sampler=ShardSampler(val_set, self.world_size, self.rank), persistent_workers=cfg.workers > 0, **common)
        if cfg.workers > 0:
            iter(self.val_loader)  # starts the validation workers now, while the heap is small
        # whole accumulation groups only: the tail of an epoch that does not fill one is dropped
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        self.batches_per_epoch = self.steps_per_epoch * cfg.accum_steps
        self.total_steps = cfg.iters or cfg.epochs * self.steps_per_epoch
        self.eval_interval = cfg.eval_every * (self.steps_per_epoch if cfg.epochs else 1)
        self.bar_interval = self.steps_per_epoch if cfg.epochs else cfg.eval_every

    def _prepare_run_dir(self, lock: RunLock) -> None:
        """Rank 0 takes the run directory (lock, clean-up, --overwrite); every process learns whether it could."""
        error = None
        if self.main:
            try:
                prepare(self.run_dir, lock, self.cfg.resume, self.cfg.overwrite)
            except HatNetError as e:
                error = e
        message = dist.all_gather_object(None if error is None else str(error))[0]
        if message is not None:
            raise error or HatNetError(message)

    def _write_config(self) -> None:
        header = (f'# hatnet {__version__} {self.task.name} run; {self.world_size} process(es), global batch '
                  f'{self.cfg.batch_size * self.world_size * self.cfg.accum_steps}, effective lr {self.lr:.6g}, '
                  f'{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in total\n')
        # the auto recipe's reasons as comments: the file stays a recipe that --resume and --recipe read back
        reasons = ''.join(f'# auto: {c.key} = {c.value} ({c.why})\n' for c in self.choices)
        body = yaml.safe_dump(config_dict(self.cfg, self.task.config), sort_keys=False)
        write_text_atomic(self.run_dir / CONFIG_YAML, header + reasons + body)

    # ---------------------------------------------------------------- training
    def fit(self) -> Dict[str, Any]:
        self._print(f'{self.task.name}: {self.total_steps} steps ({self.steps_per_epoch} per epoch) on {self.device}'
                    f' x {self.world_size}, run directory {self.run_dir}')
        for choice in self.choices:
            self._print(f'  auto recipe: {choice.key} = {choice.value}  ({choice.why})')
        if self.cfg.amp == 'bf16' and self.device.type == 'cpu' and cpu_emulates_bf16():
            self._print(f'  note: {EMULATED_BF16_NOTE}; --amp none is faster')
        try:
            self._train_to_the_end()
        except DatasetError as e:
            self._keep_work_done(e)
        return self._finish()

    def _keep_work_done(self, error: DatasetError) -> None:
        """A file that broke in the middle of the run (a truncated JPEG passes the header checks and fails only
        when decoded): save the steps done, so that replacing the file and ``--resume`` loses nothing."""
        if self.step == 0 or dist.is_distributed():  # nothing to keep; ranks would wait for each other to save
            raise error
        self._save_last()
        raise DatasetError(f'{worker_message(error)} (at step {self.step}; the run is saved: replace or remove the '
                           f'file, then continue it with --resume)') from None

    def _train_to_the_end(self) -> None:
        if self.step and self._eval_due() and (not self.history or self.history[-1]['step'] != self.step):
            self._evaluate_and_save()  # the evaluation a broken file interrupted (see _keep_work_done)
        clock = StepClock(self.step, self.total_steps, self.device)
        batches = None
        while self.step < self.total_steps:
            bar_start = self.step // self.bar_interval * self.bar_interval
            bar_end = min(bar_start + self.bar_interval, self.total_steps)
            with self._progress_bar(bar_start, bar_end) as bar:
                while self.step < bar_end:
                    if batches is None:
                        batches = self._epoch_batches()
                    self._train_step([next(batches) for _ in range(self.cfg.accum_steps)], bar)
                    estimate = clock.tick(self.step)
                    if estimate:
                        self._print(estimate + self._evaluations_left())
                    self.batch_in_epoch += self.cfg.accum_steps
                    if self.batch_in_epoch == self.batches_per_epoch:
                        self.epoch, self.batch_in_epoch, batches = self.epoch + 1, 0, None
                    if self.cfg.save_every and self.step % self.cfg.save_every == 0 and not self._eval_due():
                        self._save_last()
            if self._eval_due():
                self._evaluate_and_save()

    def _evaluations_left(self) -> str:
        count = len(range(self.step // self.eval_interval * self.eval_interval + self.eval_interval,
                          self.total_steps, self.eval_interval)) + 1  # the last step is always evaluated
        return f', plus {count} evaluation(s) on {len(self.val_loader.dataset)} images'

    def _eval_due(self) -> bool:
        return self.step % self.eval_interval == 0 or self.step == self.total_steps

    def _epoch_batches(self):
        """Iterator over the rest of the current epoch's micro-batches."""
        self.train_sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.cfg.batch_size)
        return iter(self.train_loader)

    def _autocast(self):
        return amp_autocast(self.cfg.amp, self.device)

    def _train_step(self, micro_batches: list, bar) -> None:
        self.ddp_model.train()
        for i, batch in enumerate(micro_batches):
            # gradients are synchronised across processes on the last micro-batch only
            sync = i == len(micro_batches) - 1 or not dist.is_distributed()
            with (nullcontext() if sync else self.ddp_model.no_sync()):
                with self._autocast():
                    loss, scalars = self.task.train_step(self.ddp_model, batch, self.device)
                if not torch.isfinite(loss):
                    raise HatNetError(f'the loss is {float(loss)} at step {self.step + 1}: training diverged '
                                      f'(lower the lr, set clip_grad, or check the data)')
                self.scaler.scale(loss / len(micro_batches)).backward()
            for key, value in {'loss': loss.detach(), **scalars}.items():
                self.sums[key] = self.sums.get(key, 0.) + float(value) / len(micro_batches)
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.sums['steps'] = self.sums.get('steps', 0) + 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.scheduler.step_update(self.step)

        bar.update(1)
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            loss = loss.item()
            # tqdm's smoothed steps/s (data loading included) -> images/s of all processes
            img_per_s = (bar.format_dict['rate'] or 0.) * self.cfg.batch_size * self.world_size * len(micro_batches)
            bar.set_postfix_str(f'loss {loss:.4f}  lr {self._current_lr():.2e}  {img_per_s:.1f} img/s')
            if self.log is not None:
                self.log.scalars({'train/loss': loss, 'train/lr': self._current_lr()}, self.step)

    def _current_lr(self) -> float:
        return max(group['lr'] for group in self.optimizer.param_groups)

    def _progress_bar(self, start: int, end: int):
        desc = f'epoch {self.epoch + 1}/{self.cfg.epochs}' if self.cfg.epochs else \
            f'steps {start + 1}-{end}/{self.total_steps}'
        return tqdm(total=end - start, initial=self.step - start, desc=desc, unit='step', dynamic_ncols=True,
                    leave=True, disable=not self.main)

    # ---------------------------------------------------------------- evaluation and checkpoints
    def _evaluate(self, model) -> Dict[str, float]:
        dist.broadcast_buffers(model)
        model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(model, self.val_loader, self.device)
        if self.task.primary_metric not in metrics:
            raise KeyError(f'{type(self.task).__name__}.evaluate() returned no {self.task.primary_metric!r} '
                           f'(its primary_metric); it returned {sorted(metrics)}')
        return {k: float(v) for k, v in metrics.items()}

    def _evaluate_and_save(self) -> None:
        sums = self._reduced_sums()
        steps = sums.pop('steps', 0) or 1
        row = {'epoch': round(self.step / self.steps_per_epoch, 3), 'step': self.step, 'lr': self._current_lr()}
        row.update({f'train_{k}': v / steps for k, v in sums.items()})
        row.update({f'val_{k}': v for k, v in self._evaluate(self.model).items()})
        candidates = {'model': row[f'val_{self.task.primary_metric}']}
        if self.ema is not None:
            row.update({f'val_ema_{k}': v for k, v in self._evaluate(self.ema.module).items()})
            candidates['ema'] = row[f'val_ema_{self.task.primary_metric}']
        row['time_s'] = round(self.elapsed + time.time() - self.session_start, 1)
        self.history.append(row)
        self.sums = {}

        source = max(candidates, key=candidates.get)
        improved = not self.best or candidates[source] > self.best['value']
        if improved:
            self.best = {'metric': self.task.primary_metric, 'value': candidates[source], 'weights': source,
                         'step': self.step}
        if self.main:
            self._print(' '.join(f'{k} {v:.4g}' for k, v in row.items() if k != 'time_s')
                        + ('  (best)' if improved else ''))
            self.log.write_csv(self.history)
            self.log.scalars({k.replace('_', '/', 1): v for k, v in row.items() if k not in ('epoch', 'step')},
                             self.step)
            if improved:
                weights = self.model if source == 'model' else self.ema.module
                save_atomic(dict(self._identity(row), model=weights.state_dict(), weights=source),
                            self.run_dir / BEST)
        self._save_last()

    def _reduced_sums(self) -> Dict[str, float]:
        keys = sorted(self.sums)
        totals = dist.all_reduce_sum([self.sums[k] for k in keys]).tolist()
        return {k: v / self.world_size for k, v in zip(keys, totals)}

    def _identity(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        return dict(format=FORMAT, task=self.task.name, task_state=self.task.state(), metrics=metrics,
                    epoch=self.epoch, step=self.step, config=config_dict(self.cfg, self.task.config))

    def _save_last(self) -> None:
        # every process contributes its generator states and running sums; rank 0 writes
        ranks = dist.all_gather_object({'rng': capture_rng_state(), 'sums': dict(self.sums)})
        if not self.main:
            return
        state = self._identity(self.history[-1] if self.history else {})
        state.update(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            batch_in_epoch=self.batch_in_epoch, batches_per_epoch=self.batches_per_epoch, best=self.best,
            history=self.history,
            elapsed=self.elapsed + time.time() - self.session_start,
            world_size=self.world_size, ranks=ranks)
        save_atomic(state, self.run_dir / LAST)

    def _load_last(self) -> None:
        path = self.run_dir / LAST
        state = load_file(path)
        if not (isinstance(state, dict) and state.get('format') == FORMAT and 'optimizer' in state):
            raise CheckpointError(f'{path} is not a hatnet training checkpoint')
        if state['world_size'] != self.world_size:
            raise CheckpointError(f'{path} was written by a run of {state["world_size"]} processes; resume it with '
                                  f'the same number (now {self.world_size}) to continue it exactly')
        if state['task'] != self.task.name:
            raise CheckpointError(f'{path} is a {state["task"]} run, not a {self.task.name} one')
        saved = state.get('config', {})
        changed = [k for k in BATCH_SETTINGS if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            raise CheckpointError(
                f'{path} was written with {", ".join(f"{k} {saved[k]}" for k in changed)}, this run has '
                f'{", ".join(f"{k} {getattr(self.cfg, k)}" for k in changed)}: resume with the same batch settings '
                f'(which samples an epoch has left depends on them), or start a new run')
        if state.get('batches_per_epoch', self.batches_per_epoch) != self.batches_per_epoch:
            raise CheckpointError(f'{path} was written with {state["batches_per_epoch"]} batches per epoch, the data '
                                  f'now gives {self.batches_per_epoch}: the training set changed; resume on the same '
                                  f'data, or start a new run')
        load_weights(self.model, state['model'], source=str(path))
        self.optimizer.load_state_dict(state['optimizer'])
        # the schedule is a function of the step and the settings: it is rebuilt, not loaded, so that a resumed
        # run may change its length (e.g. --epochs 400 to continue a 300-epoch run)
        self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state['ema'] is not None:
            self.ema.module.load_state_dict(state['ema'])
        elif self.ema is not None:
            self.ema.set(self.model)
        self.step, self.epoch, self.batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']
        self.best, self.history, self.elapsed = state['best'], state['history'], state['elapsed']
        own = state['ranks'][self.rank]
        restore_rng_state(own['rng'])
        self.sums = own['sums']
        if self.step >= self.total_steps:
            self._print(f'{path} is at step {self.step} of {self.total_steps}: the run is already complete')
        else:
            self._print(f'resuming {self.run_dir} at step {self.step} (epoch {self.epoch + 1}, '
                        f'batch {self.batch_in_epoch} of {self.batches_per_epoch})')

    def _finish(self) -> Dict[str, Any]:
        if self.main:
            plot_curves(self.history, self.run_dir / CURVES_PNG, self.task.primary_metric)
            self.log.close()
            self._print(f'best val_{self.best["metric"]} {self.best["value"]:.4g} ({self.best["weights"]} weights, '
                        f'step {self.best["step"]}); checkpoints, metrics.csv and {CURVES_PNG} in {self.run_dir}')
        return {'run_dir': str(self.run_dir), 'metrics': self.history[-1], 'best': self.best}

    def _print(self, message: str) -> None:
        if self.main:
            tqdm.write(message)
            append_text(self.run_dir / LOG_TXT, f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}\n')
