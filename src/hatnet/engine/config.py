"""Trainer settings and recipe files.

A recipe is a flat YAML mapping: keys that are :class:`TrainConfig` fields configure the trainer, the other
keys go to the task's own config; a key neither knows is an error. Command-line options override recipes.

The run directory's ``config.yaml`` is written in the same format, so every run is itself a recipe, and
``--resume`` reads it back (options given again on the command line still override it).
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import yaml

from ..errors import CheckpointError, HatNetError

RECIPE_DIR = Path(__file__).resolve().parent.parent / 'recipes'


@dataclass
class TrainConfig:
    out: str = ''                   # run directory
    # length: exactly one of epochs / iters is > 0 (iters counts optimiser steps)
    epochs: int = 0
    iters: int = 0
    batch_size: int = 32            # per process
    eval_batch_size: int = 0        # per process, 0: batch_size
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
    sched: str = 'cosine'           # cosine | poly | step | constant (or another timm scheduler name)
    min_lr: float = 0.0
    warmup_epochs: float = 0.0      # warm-up length in epochs ...
    warmup_iters: int = 0           # ... and/or in optimiser steps (both add up)
    warmup_lr: float = 1e-6
    decay_milestones: List[int] = field(default_factory=list)  # 'step': epochs (or iters) where lr *= decay_rate
    decay_rate: float = 0.1
    poly_power: float = 0.9
    # numerics and speed
    amp: str = 'none'               # none | bf16 (CPU and CUDA) | fp16 (CUDA, with a GradScaler)
    channels_last: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = True         # ramp the EMA decay up over the first steps (timm ModelEmaV3 use_warmup)
    seed: int = 0
    device: str = 'auto'            # auto | cpu | cuda | cuda:N
    threads: int = 0                # intra-op CPU threads per process (0: PyTorch's default, one per core)
    # bookkeeping
    eval_every: int = 1             # epochs for epoch runs, optimiser steps for iteration runs
    save_every: int = 0             # also write 'last' every N optimiser steps (0: only at evaluation points)
    log_every: int = 10             # optimiser steps between progress-bar / TensorBoard updates
    resume: bool = False
    overwrite: bool = False


# Keys that describe one invocation rather than the run; never written to config.yaml.
INVOCATION_KEYS = ('resume', 'overwrite')


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
