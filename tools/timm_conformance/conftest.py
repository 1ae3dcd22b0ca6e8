"""Run timm's own tests/test_models.py against the hat_net models.

timm's test module builds its parameter lists with ``timm.list_models`` when it is imported. This conftest
is imported first: it registers the hat_net models and makes every per-module allow-list that names
``pvt_v2`` (forward_intermediates, features getter, pruning contract) also name ``hat_net``, so the
hat_net models are held to exactly the tests that pvt_v2 runs.

With no network, the tests that load pretrained weights find stand-in checkpoints (original layout, built
by hatnet.reference) in a temporary timm cache, unless real ones are already cached.
"""
import os
import tempfile
from pathlib import Path

import timm
import torch

import hatnet  # noqa: F401  (registers hat_net_*)

_timm_list_models = timm.list_models


def _list_models_with_hat_net(filter='', module='', *args, **kwargs):
    modules = [module] if isinstance(module, str) else list(module)
    if 'pvt_v2' in modules:
        module = modules + ['hat_net']
    return _timm_list_models(filter, module, *args, **kwargs)


timm.list_models = _list_models_with_hat_net


def _cache_stand_in_weights():
    from timm.models._hub import get_cache_dir

    from hatnet.reference import VARIANT_NAMES, reference_state_dict
    if all(Path(get_cache_dir(), Path(_url(name)).name).exists() for name in VARIANT_NAMES.values()):
        return
    os.environ['TORCH_HOME'] = tempfile.mkdtemp(prefix='hatnet-timm-tests-')
    for short, name in VARIANT_NAMES.items():
        torch.save({'model': reference_state_dict(short, 0)}, Path(get_cache_dir(), Path(_url(name)).name))


def _url(model_name):
    return timm.models.get_pretrained_cfg(model_name).url


def pytest_configure(config):
    _cache_stand_in_weights()
    for marker in ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward',
                   'fxbackward', 'timeout'):
        config.addinivalue_line('markers', f'{marker}: timm test marker')
