"""Model definitions. Importing this package registers the hat_net_* models in timm."""
from .hat_net import HatNet, VARIANT_ARGS, checkpoint_filter_fn, guess_variant

MODEL_NAMES = tuple(VARIANT_ARGS)

__all__ = ['HatNet', 'MODEL_NAMES', 'VARIANT_ARGS', 'checkpoint_filter_fn', 'guess_variant']
