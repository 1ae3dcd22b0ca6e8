"""Trainer settings and recipe files.

A recipe is a flat YAML mapping: keys that are :class:`TrainConfig` fields configure the trainer, the other
keys go to the task's own config; a key neither knows is an error. Command-line options override recipes.

The run directory's ``config.yaml`` is written in the same format, so every run is itself a recipe, and
``--resume`` reads it back (options given again on the command line still override it).
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Type

import yaml

from ..errors import CheckpointError, HatNetError

RECIPE_DIR = Path(__file__).resolve().parent.parent / 'recipes'


# Help panels of the settings, shown by every ``train`` command (the fields' ``group``)
RUN, OPTIMISATION, SPEED, BOOKKEEPING = 'run', 'optimisation', 'numerics and speed', 'bookkeeping'


def _setting(default: Any, help: str, group: str) -> Any:
    """A field with its help text and help panel: the command line builds its options from them."""
    metadata = dict(help=help, group=group)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """The trainer's settings (docs/training.md). Every ``train`` command offers each as an option."""
    out: str = _setting('', 'Run directory (train commands: runs/[TASK-]MODEL-DATA by default).', RUN)
    # the run's length: exactly one of epochs / iters is > 0
    epochs: int = _setting(0, 'Length of the run in epochs.', RUN)
    iters: int = _setting(0, 'Length of the run in optimiser steps (instead of epochs; epochs then wrap around '
                             'the data).', RUN)
    batch_size: int = _setting(32, 'Images per process and step (before accumulation).', RUN)
    eval_batch_size: int = _setting(0, 'Images per process at evaluation (0: batch_size).', RUN)
    accum_steps: int = _setting(1, 'Gradient accumulation: micro-batches per optimiser step.', RUN)
    workers: int = _setting(2, 'Data-loading processes per training process.', RUN)
    # optimisation, built with timm's create_optimizer_v2 / create_scheduler_v2
    opt: str = _setting('adamw', "Any timm optimizer (create_optimizer_v2); no weight decay on norms and "
                                 "biases.", OPTIMISATION)
    lr: float = _setting(1e-3, 'Peak learning rate.', OPTIMISATION)
    lr_base_size: int = _setting(0, 'If > 0: scale lr by (global batch x accum_steps) / this (linear '
                                    'scaling).', OPTIMISATION)
    weight_decay: float = _setting(0.05, 'Weight decay.', OPTIMISATION)
    momentum: float = _setting(0.9, 'Momentum (SGD-like optimizers).', OPTIMISATION)
    layer_decay: Optional[float] = _setting(None, "Layer-wise lr decay (models with timm's group_matcher, e.g. "
                                                  "hat_net_*).", OPTIMISATION)
    clip_grad: Optional[float] = _setting(None, 'Clip the global gradient norm.', OPTIMISATION)
    sched: str = _setting('cosine', 'cosine | poly | step | constant (or another timm scheduler); stepped after '
                                    'every optimiser step.', OPTIMISATION)
    min_lr: float = _setting(0.0, 'Floor of the cosine / poly schedule.', OPTIMISATION)
    warmup_epochs: float = _setting(0.0, 'Linear warm-up in epochs (adds up with warmup_iters).', OPTIMISATION)
    warmup_iters: int = _setting(0, 'Linear warm-up in optimiser steps (adds up with warmup_epochs).',
                                 OPTIMISATION)
    warmup_lr: float = _setting(1e-6, 'Learning rate the warm-up starts from.', OPTIMISATION)
    decay_milestones: List[int] = _setting([], "sched step: epochs (epoch runs) or steps (iteration runs) after "
                                               "which lr is multiplied by decay_rate.", OPTIMISATION)
    decay_rate: float = _setting(0.1, 'sched step: lr factor at each milestone.', OPTIMISATION)
    poly_power: float = _setting(0.9, 'sched poly: power of the decay.', OPTIMISATION)
    # numerics and speed
    amp: str = _setting('none', 'none | bf16 (autocast, CPU and CUDA) | fp16 (CUDA, with a GradScaler).', SPEED)
    channels_last: bool = _setting(True, 'Convert the model to the NHWC memory format, the one PyTorch recommends for '
                                         'convolutions on CPU (oneDNN) and CUDA. hat_net models compute in NHWC '
                                         'either way (the same numbers bit for bit); other backbones train as fast '
                                         'or faster.', SPEED)
    compile: bool = _setting(False, 'torch.compile (inductor) the training forward and backward; the first steps '
                                    'compile (minutes on a CPU).', SPEED)
    ema: bool = _setting(False, "Keep an EMA of the weights (timm ModelEmaV3), evaluated too (val_ema_*).", SPEED)
    ema_decay: float = _setting(0.9998, 'Decay of the EMA.', SPEED)
    ema_warmup: bool = _setting(True, 'Ramp the EMA decay up over the first steps (ModelEmaV3 use_warmup).',
                                SPEED)
    seed: int = _setting(0, 'Initial weights, data order, augmentation.', SPEED)
    device: str = _setting('auto', 'auto | cpu | cuda | cuda:N.', SPEED)
    threads: int = _setting(0, "Intra-op CPU threads per process (0: PyTorch's default, one per core).", SPEED)
    # bookkeeping
    eval_every: int = _setting(1, 'Evaluate every N epochs (epoch runs) or optimiser steps (iteration runs); '
                                  'the last step is always evaluated.', BOOKKEEPING)
    save_every: int = _setting(0, "Also write last.pth every N optimiser steps (0: only at evaluations).",
                               BOOKKEEPING)
    log_every: int = _setting(10, 'Optimiser steps between progress-bar / TensorBoard updates.', BOOKKEEPING)
    resume: bool = _setting(False, "Continue the run in --out from its last checkpoint, with its config.yaml "
                                   "as the recipe.", BOOKKEEPING)
    overwrite: bool = _setting(False, 'Delete the run in --out and start again.', BOOKKEEPING)


class Range(NamedTuple):
    """The values a numeric setting may take: ``low`` .. ``high``, both included unless ``low_open``."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.high == math.inf:
            return f'{">" if self.low_open else ">="} {self.low:g}'
        return f'{"above" if self.low_open else "from"} {self.low:g} to {self.high:g}'


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, FRACTION = Range(0, low_open=True), Range(0), Range(1), Range(0, 1)

# The ranges of the trainer's numeric settings (checked before anything is built or written).
TRAIN_RANGES = dict(
    epochs=NON_NEGATIVE, iters=NON_NEGATIVE, batch_size=AT_LEAST_ONE, eval_batch_size=NON_NEGATIVE,
    accum_steps=AT_LEAST_ONE, workers=NON_NEGATIVE, lr=POSITIVE, lr_base_size=NON_NEGATIVE,
    weight_decay=NON_NEGATIVE, momentum=FRACTION, layer_decay=Range(0, 1, low_open=True), clip_grad=POSITIVE,
    min_lr=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE, warmup_iters=NON_NEGATIVE, warmup_lr=NON_NEGATIVE,
    decay_milestones=AT_LEAST_ONE, decay_rate=POSITIVE, poly_power=POSITIVE, ema_decay=FRACTION,
    threads=NON_NEGATIVE, eval_every=AT_LEAST_ONE, save_every=NON_NEGATIVE, log_every=AT_LEAST_ONE)


def check_ranges(config: Any, ranges: Mapping[str, Range]) -> None:
    """One HatNetError for the first setting of ``config`` (a dataclass) outside its range (NaN never is
    inside); None means "not set" and passes, the items of a list are checked one by one."""
    for name, allowed in ranges.items():
        value = getattr(config, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and item not in allowed:
                raise HatNetError(f'{name} must be {allowed}, got {item!r}')


# Keys that describe one invocation rather than the run; never written to config.yaml.
INVOCATION_KEYS = ('resume', 'overwrite')
# Settings renamed since older runs wrote their config.yaml: read under the current name, so those runs resume.
RENAMED_KEYS = {'freeze_stages': 'frozen_stages'}


def bundled_recipes() -> List[str]:
    """Names of the recipes shipped with hatnet (``src/hatnet/recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob('*.yaml'))


def find_recipe(name_or_path: str, aliases: Optional[Mapping[str, str]] = None) -> Path:
    """A recipe file: an existing path, a bundled recipe name, or an alias of one (e.g. ``paper``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = (aliases or {}).get(name_or_path, name_or_path)
    bundled = RECIPE_DIR / f'{name}.yaml'
    if bundled.is_file():
        return bundled
    known = ', '.join(sorted(set(bundled_recipes()) | set(aliases or {})))
    raise HatNetError(f'recipe {name_or_path!r} is neither a file nor a bundled recipe ({known})')


def load_recipe(path) -> Dict[str, Any]:
    """Read a flat YAML mapping of settings."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as e:
        raise HatNetError(f'cannot read recipe {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise HatNetError(f'recipe {path} is not valid YAML ({str(e).splitlines()[0]})') from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise HatNetError(f'recipe {path} must be a mapping of settings, got a {type(values).__name__}')
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise HatNetError(f'recipe {path} must be flat (key: value), but {nested[0]!r} holds a mapping')
    return values


def _coerce(key: str, value: Any, type_: Any) -> Any:
    """``value`` as ``type_`` (the dataclass field's annotation), or one error naming the key."""
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple, List, Tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = args[0] if args else Any
        return [_coerce(key, v, item_type) for v in items]
    try:
        if type_ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no'):
                return value.lower() in ('true', 'yes')
        elif type_ is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            if isinstance(value, str):
                return int(value)
        elif type_ is float and not isinstance(value, bool):
            return float(value)  # also '5e-4', which YAML 1.1 reads as a string
        elif type_ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        elif type_ is Any:
            return value
    except (TypeError, ValueError):
        pass
    name = getattr(type_, '__name__', str(type_))
    raise HatNetError(f'setting {key!r}: expected {name}, got {value!r}')


def _fill(cls: Type, values: Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def build_configs(values: Mapping[str, Any], task_config_cls: Type) -> Tuple[TrainConfig, Any]:
    """Split flat settings into (TrainConfig, task config); unknown keys are one error listing them."""
    values = {RENAMED_KEYS.get(k, k): v for k, v in values.items()}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    task_keys = {f.name for f in dataclasses.fields(task_config_cls)}
    unknown = sorted(k for k in values if k not in train_keys | task_keys)
    if unknown:
        raise HatNetError(f'unknown setting{"s" if len(unknown) > 1 else ""} {", ".join(map(repr, unknown))}; '
                          f'see docs/training.md for the trainer\'s settings and the task\'s documentation')
    train_cfg = _fill(TrainConfig, {k: v for k, v in values.items() if k in train_keys})
    task_cfg = _fill(task_config_cls, {k: v for k, v in values.items() if k in task_keys and k not in train_keys})
    return train_cfg, task_cfg


def resolve_config(
        task_config_cls: Type,
        options: Mapping[str, Any],
        recipe: Optional[str] = None,
        aliases: Optional[Mapping[str, str]] = None,
) -> Tuple[TrainConfig, Any]:
    """Settings for one ``train`` invocation: dataclass defaults < recipe (or, with ``resume``, the run's own
    ``config.yaml``) < ``options`` whose value is not None (the options given on the command line).

    A length given in ``options`` (epochs or iters) replaces the recipe's, and the recipe's lr steps move to
    the same fractions of the new length: ``--epochs 24`` turns steps at epochs 8 and 11 of a 12-epoch recipe
    into 16 and 22 (the 2x schedule), ``--iters 300`` into steps 200 and 275; an epoch recipe's evaluation
    interval becomes the same fraction of an iteration run.
    """
    options = {k: v for k, v in options.items() if v is not None}
    values: Dict[str, Any] = {}
    if options.get('resume'):
        if options.get('overwrite'):
            raise HatNetError('--resume and --overwrite contradict each other; pass one of them')
        if recipe is not None:
            raise HatNetError('--resume continues a run with its own config.yaml; do not pass --recipe with it')
        run_dir = Path(options.get('out') or '')
        if not (run_dir / 'config.yaml').is_file():
            raise CheckpointError(f'cannot resume: {run_dir} is not a run directory (no config.yaml)')
        values = load_recipe(run_dir / 'config.yaml')
    elif recipe is not None:
        values = load_recipe(find_recipe(recipe, aliases))
        _rescale_schedule(values, options)
    # epochs and iters are one setting: giving either one replaces the other
    for given, other in (('epochs', 'iters'), ('iters', 'epochs')):
        if options.get(given) and not options.get(other):
            values.pop(other, None)
    values.update(options)
    return build_configs(values, task_config_cls)


def _rescale_schedule(recipe: Dict[str, Any], options: Mapping[str, Any]) -> None:
    """Move the recipe's lr steps (and an epoch recipe's eval interval) to a length given in ``options``."""
    old_length = recipe.get('epochs') or recipe.get('iters')
    new_length = options.get('epochs') or options.get('iters')
    if not (old_length and new_length):
        return
    scale = new_length / old_length
    recipe['decay_milestones'] = [max(1, round(m * scale)) for m in recipe.get('decay_milestones', [])]
    if recipe.get('epochs') and options.get('iters'):
        recipe['eval_every'] = max(1, round(recipe.get('eval_every', 1) * scale))


def config_dict(train_cfg: TrainConfig, task_cfg: Any = None) -> Dict[str, Any]:
    """The flat mapping written to a run's ``config.yaml`` (task settings first, then the trainer's)."""
    values = dataclasses.asdict(task_cfg) if task_cfg is not None else {}
    values.update({k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in INVOCATION_KEYS})
    return values
