"""hatnet: HAT-Net (Vision Transformers with Hierarchical Attention) as a timm backbone.

``import hatnet`` registers ``hat_net_tiny``, ``hat_net_small``, ``hat_net_medium`` and ``hat_net_large``
in timm's registry, so ``timm.create_model('hat_net_tiny', ...)`` works everywhere timm does.

``hatnet.load(run)`` brings any trained run back for inference::

    predictor = hatnet.load('runs/ade')           # classification, segmentation or detection
    results = predictor.predict(['a.jpg', pil_image, numpy_array])
    metrics = predictor.evaluate('/data/ADEChallengeData2016')
"""
from . import models
from .errors import CheckpointError, DatasetError, HatNetError, InputError, OutputError
from .models import MODEL_NAMES, HatNet

__version__ = '0.1.0'

__all__ = ['CheckpointError', 'DatasetError', 'HatNet', 'HatNetError', 'InputError', 'MODEL_NAMES', 'OutputError',
           'load', 'models']


def load(run, device: str = 'auto', amp: str = 'none', **options):
    """A trained model ready for inference: a run directory (its best checkpoint), a checkpoint file, or a bare
    weights file (an original HAT-Net ``.pth``, a hatnet ``.safetensors``, a timm checkpoint: a classifier).

    ``amp``: 'bf16' or 'fp16' runs every prediction and evaluation under autocast in that dtype (faster on CPUs
    with AVX-512-BF16 or AMX and on CUDA, outputs slightly different from float32's).

    The checkpoint's ``task`` picks the task; ``options`` go to its ``Task.load``: classification ``model``,
    ``img_size``; segmentation ``short_side``, ``slide``, ``window``; detection ``score_thresh``,
    ``detections_per_img``, ``min_size``, ``max_size``. Returns a :class:`~hatnet.tasks.predictor.Predictor`:
    ``predict(images)`` and ``evaluate(data)``.
    """
    from .engine.checkpoint import load_run_checkpoint
    from .tasks import get_task

    checkpoint = load_run_checkpoint(run)
    return get_task(checkpoint.task or 'classification').load(checkpoint, device=device, amp=amp, **options)
