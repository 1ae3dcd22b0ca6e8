"""The one model factory: every task, the benchmark and the export create their networks here.

``create(name, weights=...)`` builds any timm model (the hat_net variants or any other) as a classifier or as a
``features_only`` backbone, loads weights strictly and freezes early stages. One meaning of "weights" for every
task and every backbone: a checkpoint file (an original HAT-Net ``.pth``, a hatnet ``.safetensors``, a timm
checkpoint, a training run's ``best.pth``), a run directory, or a state_dict. Every weight must fit; the only
weights that may be left out or replaced are the classifier's, when the model gets another number of classes
or no classifier (backbones). Anything else -- a missing block, an unexpected key, another shape -- is one
:class:`~hatnet.errors.CheckpointError` naming it, whatever the model.
"""
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ..errors import CheckpointError, HatNetError
from ..fileio import RUN_FORMAT, load_file, run_checkpoint_file, unwrap_state_dict
from .weights import check_fits

__all__ = ['create', 'freeze_stages', 'read_weights']

Weights = Union[str, Path, Mapping[str, torch.Tensor]]


def create(
        name: str,
        weights: Optional[Weights] = None,
        *,
        num_classes: Optional[int] = None,
        features_only: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        drop_path_rate: Optional[float] = None,
        frozen_stages: int = 0,
        source: str = '',
        **kwargs,
) -> nn.Module:
    """A timm model, with ``weights`` loaded strictly.

    Args:
        name: ``hat_net_{tiny,small,medium,large}`` or any timm model name.
        weights: checkpoint file, run directory or state_dict (see the module docstring); None: random init.
        num_classes: classifier outputs; default: the checkpoint's (a new classifier is initialised when it
            differs), 1000 without weights. Ignored for ``features_only``.
        features_only: return the timm feature extractor (a list of maps at strides 4, 8, 16, 32 for hat_net).
        out_indices: the feature levels to return (negative: counted from the last); default: all.
        drop_path_rate: stochastic depth (None: the model's default).
        frozen_stages: freeze the stem and this many stages (see :func:`freeze_stages`).
        source: what to call state_dict ``weights`` in messages (e.g. the file they were read from).
        **kwargs: passed to ``timm.create_model`` (``in_chans``, ``drop_rate``, ``img_size``, ...).
    """
    if not timm.is_model(name):
        raise HatNetError(f'unknown model {name!r}: use hat_net_tiny, hat_net_small, hat_net_medium, hat_net_large '
                          f'or any timm model name')
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if features_only:
        kwargs['features_only'] = True
        if out_indices is not None:
            kwargs['out_indices'] = tuple(out_indices)
        num_classes = None

    if weights is None:
        model = _timm_create(name, **(kwargs if num_classes is None else dict(kwargs, num_classes=num_classes)))
    else:
        state_dict, read_from = read_weights(weights)
        model = _create_with_weights(name, state_dict, source or read_from, num_classes, kwargs)
    freeze_stages(model, frozen_stages)
    return model


def read_weights(weights: Weights) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state_dict, description for messages) from a checkpoint file, a run directory or a state_dict."""
    if isinstance(weights, Mapping):
        return unwrap_state_dict(weights, source='state_dict'), 'state_dict'
    path = run_checkpoint_file(weights)
    checkpoint = load_file(path)
    if isinstance(checkpoint, dict) and checkpoint.get('format') == RUN_FORMAT \
            and checkpoint.get('task') != 'classification':
        raise CheckpointError(f'{path} is a {checkpoint.get("task")} run; weights for a backbone or classifier come '
                              f'from a classification run or an ImageNet checkpoint')
    return unwrap_state_dict(checkpoint, source=str(path)), str(path)


def _timm_create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # e.g. VGG has no stochastic depth
        if 'drop_path_rate' not in str(e):
            raise
        raise HatNetError(f'{name} has no stochastic depth (drop_path_rate); leave it unset for this model') from None


def _classifier_keys(model: nn.Module) -> Tuple[str, ...]:
    classifiers = model.pretrained_cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return tuple(f'{c}.{p}' for c in classifiers for p in ('weight', 'bias'))


def _filter_fn(name: str):
    """The model's own checkpoint converter (timm convention: ``checkpoint_filter_fn`` beside the model)."""
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    return getattr(module, 'checkpoint_filter_fn', None)


def _create_with_weights(name: str, state_dict: Dict[str, torch.Tensor], source: str, num_classes: Optional[int],
                         kwargs: dict) -> nn.Module:
    """Convert the weights with the model's own filter, check them strictly against the classifier form, then
    let timm load them (it adapts the first convolution to ``in_chans`` and wraps ``features_only`` models)."""
    features_only = kwargs.get('features_only', False)
    arch_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'out_indices')}
    probe = _timm_create(name, **arch_kwargs)  # the classifier form: the layout the weights must have
    filter_fn = _filter_fn(name)
    if filter_fn is not None:
        state_dict = filter_fn(dict(state_dict), probe)
    head_keys = _classifier_keys(probe)
    head = state_dict.get(head_keys[0]) if head_keys else None
    checkpoint_classes = 0 if head is None else head.shape[0]
    if features_only:
        num_classes = 0
    elif num_classes is None:
        num_classes = checkpoint_classes or probe.num_classes
    keep_head = head is not None and num_classes == checkpoint_classes
    if not keep_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
    # only the classifier (and a first convolution that timm adapts to other input channels) may differ
    adaptable = head_keys
    first_conv = probe.pretrained_cfg.get('first_conv')
    if first_conv and kwargs.get('in_chans', 3) != 3:
        adaptable += tuple(f'{c}.weight' for c in ((first_conv,) if isinstance(first_conv, str) else first_conv))
    check_fits(state_dict, probe, source=source, adaptable=adaptable)
    overlay = dict(state_dict=state_dict, num_classes=checkpoint_classes if keep_head else 0)
    return _timm_create(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs)


def freeze_stages(model: nn.Module, num_stages: int) -> None:
    """Freeze everything up to the end of the ``num_stages``-th stage: the stem and the first stages.

    A stage is a feature level of stride 4 or more (timm's ``feature_info``): for hat_net ``stem`` +
    ``stages.0`` ... ``stages.{n-1}``, for a ResNet ``conv1``/``bn1`` + ``layer1`` .... Works alike on the
    classifier and on the ``features_only`` form. Frozen parameters get no gradient and frozen BatchNorm layers
    become timm's FrozenBatchNorm2d, so their statistics stay as loaded.
    """
    if num_stages <= 0:
        return
    info = model.feature_info
    entries = info.info if hasattr(info, 'info') else info   # FeatureInfo (features_only) or a list of dicts
    stages = [entry['module'] for entry in entries if entry['reduction'] >= 4]
    if num_stages > len(stages):
        raise HatNetError(f'cannot freeze {num_stages} stages: the model has {len(stages)}')
    last = stages[num_stages - 1]
    # feature wrappers flatten 'stages.0' to 'stages_0'
    prefixes = (last + '.', last.replace('.', '_', 1) + '.')
    names = [name for name, _ in model.named_parameters()]
    ends = [i for i, name in enumerate(names) if name.startswith(prefixes)]
    if not ends:
        raise HatNetError(f'cannot freeze stages of {type(model).__name__}: no parameters under {last}')
    frozen = set(names[:ends[-1] + 1])
    # the largest modules all of whose parameters are frozen (timm.utils.freeze also freezes their BatchNorm)
    whole = []
    for module_name, module in model.named_modules():
        params = [f'{module_name}.{p}' if module_name else p for p, _ in module.named_parameters()]
        if params and all(p in frozen for p in params) and not any(module_name.startswith(w + '.') for w in whole):
            if module_name == '':
                raise HatNetError(f'freezing {num_stages} stages would freeze the whole model')
            whole.append(module_name)
    timm.utils.freeze(model, whole)
