"""What a checkpoint holds and whether it fits a model.

* ``remap_original_keys``: the original HAT-Net checkpoint layout -> hatnet's (``checkpoint_filter_fn`` of
  ``hat_net.py`` applies it to every checkpoint timm loads).
* ``describe_architecture`` / ``guess_variant``: which HAT-Net a state_dict is.
* ``check_fits``: the one check behind every "does not fit" error (timm's pretrained path, run checkpoints,
  the model factory), naming the first mismatch, and for HAT-Net models the variant the weights look like.
* ``build_with_weights``: timm's model builder with local weight files read safely and one clear error when
  the release weights cannot be downloaded.
"""
import re
from typing import Callable, Collection, Dict, Optional
from urllib.error import URLError

import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import read_state_dict

__all__ = ['build_with_weights', 'check_fits', 'describe_architecture', 'guess_variant', 'remap_original_keys']

# Original checkpoint key -> hatnet key. Applied in order, first match wins.
_ORIGINAL_KEY_RULES = [
    (r'^patch_embed\.0\.', 'stem.conv1.'),
    (r'^patch_embed\.1\.', 'stem.norm1.'),
    (r'^patch_embed\.3\.', 'stem.conv2.'),
    (r'^ds(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv1\.0\.', r'stages.\1.blocks.\2.mlp.norm.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv1\.1\.', r'stages.\1.blocks.\2.mlp.fc1.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv2\.0\.', r'stages.\1.blocks.\2.mlp.conv_dw.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv3\.0\.', r'stages.\1.blocks.\2.mlp.fc2.'),
    (r'^blocks\.(\d+)\.(\d+)\.conv\.conv3\.1\.', r'stages.\1.blocks.\2.mlp.norm_out.'),
    (r'^blocks\.(\d+)\.(\d+)\.attn\.', r'stages.\1.blocks.\2.attn.'),
    (r'^classifier\.1\.', 'head.'),
]


def _remap_original_key(key: str) -> str:
    for pattern, replacement in _ORIGINAL_KEY_RULES:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key


def remap_original_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the keys of an original HAT-Net state_dict to hatnet's layout (others pass unchanged)."""
    if not any(k.startswith(('patch_embed.', 'blocks.')) for k in state_dict):
        return state_dict
    return {_remap_original_key(k): v for k, v in state_dict.items()}


def describe_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[dict]:
    """Stage widths, depths and MLP kernel sizes of a hatnet-layout state_dict (None if not HAT-Net)."""
    dims, depths, kernels = [], [], []
    for i in range(4):
        norm = state_dict.get(f'stages.{i}.blocks.0.attn.norm.weight')
        conv_dw = state_dict.get(f'stages.{i}.blocks.0.mlp.conv_dw.weight')
        if norm is None or conv_dw is None:
            return None
        block_ids = {int(m.group(1)) for k in state_dict for m in [re.match(rf'stages\.{i}\.blocks\.(\d+)\.', k)] if m}
        dims.append(norm.shape[0])
        depths.append(len(block_ids))
        kernels.append(conv_dw.shape[-1])
    return dict(embed_dims=tuple(dims), depths=tuple(depths), kernel_sizes=tuple(kernels))


def guess_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the hat_net variant whose architecture matches a (hatnet-layout) state_dict, or None."""
    from .hat_net import VARIANT_ARGS  # hat_net imports this module

    arch = describe_architecture(state_dict)
    for name, args in VARIANT_ARGS.items():
        if arch is not None and all(arch[k] == tuple(args[k]) for k in arch):
            return name
    return None


def check_fits(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        source: str = 'checkpoint',
        adaptable: Collection[str] = (),
) -> None:
    """Raise one CheckpointError naming the first mismatch if ``model.load_state_dict(state_dict)`` (strict)
    would fail: missing weights, then unexpected ones, then another shape.

    Args:
        state_dict: the weights, in the model's layout.
        model: the model to load them into (any module; meta tensors are fine).
        source: what the weights are, for the message (e.g. the file's path).
        adaptable: keys the loader adapts or replaces (a classifier of another size, a first convolution
            for other input channels): they may be missing, left over or of another shape.

    For a HAT-Net model the message says what the weights look like: another variant, or not HAT-Net. Weights
    that fit but would load wrongly are refused too: integer (e.g. quantised) values for floating-point weights,
    which loading would cast silently, and NaN or infinite values.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in adaptable]
    unexpected = [k for k in state_dict if k not in expected and k not in adaptable]
    mismatched = [k for k in expected if k in state_dict and k not in adaptable
                  and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        _check_values(state_dict, expected, source)
        return
    if missing:
        details = f'{len(missing)} weights missing, e.g. {missing[:3]}'
    elif unexpected:
        details = f'{len(unexpected)} unexpected weights, e.g. {unexpected[:3]}'
    else:
        key = mismatched[0]
        details = f'{key} has shape {tuple(state_dict[key].shape)}, the model needs {tuple(expected[key].shape)}'
    model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    arch = describe_architecture(state_dict)
    if describe_architecture(expected) is None or arch is not None and guess_variant(state_dict) == model_name:
        raise CheckpointError(f'{source} does not fit {model_name}: {details}')
    if arch is None:
        what = 'not' if source == 'checkpoint' else f'{source} is not'
        raise CheckpointError(f'{what} a HAT-Net checkpoint ({details})')
    variant = guess_variant(state_dict) or 'an unknown HAT-Net configuration'
    raise CheckpointError(
        f'{source} does not fit {model_name}: it looks like {variant} (stage widths {arch["embed_dims"]}, '
        f'depths {arch["depths"]}); {details}')


def _check_values(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], source: str) -> None:
    loaded = [k for k in expected if k in state_dict]
    wrong_type = [k for k in loaded if expected[k].is_floating_point() and not state_dict[k].is_floating_point()]
    if wrong_type:
        key = wrong_type[0]
        raise CheckpointError(f'{source} holds {state_dict[key].dtype} values in {len(wrong_type)} weights (e.g. '
                              f'{key}); the model needs floating-point weights (quantised checkpoints are not '
                              f'supported)')
    not_finite = [k for k in loaded if state_dict[k].is_floating_point() and not torch.isfinite(state_dict[k]).all()]
    if not_finite:
        raise CheckpointError(f'{source} holds NaN or infinite values in {len(not_finite)} weights (e.g. '
                              f'{not_finite[0]}): a damaged file, or saved from a run that diverged')


def build_with_weights(build: Callable[..., nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``build(variant, pretrained, **kwargs)`` (timm's ``build_model_with_cfg`` with the model's arguments),
    with two changes for pretrained weights:

    * a local file given as ``pretrained_cfg_overlay=dict(file=PATH)`` is read here rather than by timm:
      weights_only, safetensors, and one clear CheckpointError per missing, corrupt or foreign file;
    * a failed download of the release weights is a CheckpointError that says how to pass a local file.
    """
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if pretrained and overlay.get('file') and overlay.get('state_dict') is None:
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=read_state_dict(overlay['file']))
    try:
        return build(variant, pretrained, **kwargs)
    except URLError as e:
        import timm

        url = timm.models.get_pretrained_cfg(variant).url
        raise CheckpointError(
            f'could not download the {variant} weights from {url} ({e.reason}); download the file and pass '
            f'pretrained_cfg_overlay=dict(file=PATH)') from None
