"""Tasks the one trainer (``hatnet.engine``) runs: data, model, loss and metrics of each, and their predictors.

``TASKS`` names each task's class by module and class name; :func:`get_task` imports it on first use, so that
``import hatnet`` stays light.
"""
from typing import Type

from ..errors import CheckpointError
from ..extras import import_optional

__all__ = ['TASKS', 'get_task']

TASKS = {
    'classification': 'hatnet.tasks.classification:ClassificationTask',
    'segmentation': 'hatnet.tasks.segmentation:SegmentationTask',
    'detection': 'hatnet.tasks.detection:DetectionTask',
}


def get_task(name: str) -> Type:
    """The :class:`~hatnet.engine.Task` subclass of a task name (as stored in checkpoints)."""
    if name not in TASKS:
        raise CheckpointError(f'unknown task {name!r}: hatnet knows {", ".join(TASKS)}')
    module, cls = TASKS[name].split(':')
    return getattr(import_optional(module, f'the {name} task'), cls)
