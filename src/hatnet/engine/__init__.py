"""One trainer for every task (see ``trainer.py`` for the API)."""
from . import distributed
from .checkpoint import RunCheckpoint, load_run_checkpoint, load_weights
from .config import TrainConfig, build_configs, find_recipe, load_recipe, resolve_config
from .loaders import worker_errors_unwrapped
from .task import Task
from .trainer import check_config, train

__all__ = ['RunCheckpoint', 'Task', 'TrainConfig', 'build_configs', 'check_config', 'distributed', 'find_recipe',
           'load_recipe', 'load_run_checkpoint', 'load_weights', 'resolve_config', 'train', 'worker_errors_unwrapped']
