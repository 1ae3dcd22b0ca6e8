"""hatnet: HAT-Net (Vision Transformers with Hierarchical Attention) as a timm backbone.

``import hatnet`` registers ``hat_net_tiny``, ``hat_net_small``, ``hat_net_medium`` and ``hat_net_large``
in timm's registry, so ``timm.create_model('hat_net_tiny', ...)`` works everywhere timm does.
"""
from . import models
from .errors import CheckpointError, DatasetError, HatNetError, InputError
from .models import MODEL_NAMES, HatNet

__version__ = '0.1.0'

__all__ = ['CheckpointError', 'DatasetError', 'HatNet', 'HatNetError', 'InputError', 'MODEL_NAMES', 'models']
