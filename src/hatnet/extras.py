"""Optional dependencies, and the ``pip install 'hatnet[EXTRA]'`` that brings each.

``pip install hatnet`` is the backbone in timm plus the command line; what a task or tool needs besides comes
with an extra. A missing one is a single :class:`~hatnet.errors.HatNetError` naming the extra to install.
"""
import importlib
import importlib.util
from types import ModuleType

from .errors import HatNetError

__all__ = ['EXTRA_OF', 'import_optional', 'require']

EXTRA_OF = {
    'matplotlib': 'train', 'sklearn': 'train', 'torchmetrics': 'train',
    'pycocotools': 'det', 'faster_coco_eval': 'det',
    'onnx': 'export', 'onnxruntime': 'export',
    'fastapi': 'serve', 'uvicorn': 'serve', 'python_multipart': 'serve',
    'av': 'video',
}


def _missing(package: str, needed_by: str) -> HatNetError:
    return HatNetError(f"{needed_by} needs {package}, which is not installed: "
                       f"pip install 'hatnet[{EXTRA_OF[package]}]'")


def require(*packages: str, needed_by: str = 'this command') -> None:
    """Raise one HatNetError naming the extra of the first of ``packages`` that is not installed."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise _missing(package, needed_by)


def import_optional(module: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``; an optional package it imports that is missing is one HatNetError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = (e.name or '').split('.')[0]
        if package not in EXTRA_OF:
            raise
        raise _missing(package, needed_by) from None
