"""One trainer for every task."""
from .config import TrainConfig
from .task import Task

__all__ = ['Task', 'TrainConfig']
