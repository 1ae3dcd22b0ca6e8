"""Model definitions. Importing this package registers the hat_net_* models in timm.

``create`` is the one model factory (any timm model, strict weights, features_only, frozen stages).
"""
from .factory import create
from .hat_net import HatNet, VARIANT_ARGS, checkpoint_filter_fn
from .runtime import optimize_for_cpu
from .weights import check_fits, describe_architecture, guess_variant, remap_original_keys

MODEL_NAMES = tuple(VARIANT_ARGS)

__all__ = ['HatNet', 'MODEL_NAMES', 'VARIANT_ARGS', 'check_fits', 'checkpoint_filter_fn', 'create',
           'describe_architecture', 'guess_variant', 'optimize_for_cpu', 'remap_original_keys']
