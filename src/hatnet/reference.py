"""Equivalence with the original HAT-Net implementation.

``reference/hatnet_official_reference.json`` holds the original code's float64 logits for deterministic
stand-in checkpoints: every weight of the official state_dict is drawn from a generator seeded by the CRC32
of its key plus a weight seed, so any variant and seed can be rebuilt here without downloading anything.
``hatnet info`` runs :func:`self_check` on it.
"""
import json
import math
import zlib
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Sequence

import timm
import torch

from .models import checkpoint_filter_fn

VARIANT_NAMES = {'tiny': 'hat_net_tiny', 'small': 'hat_net_small', 'medium': 'hat_net_medium',
                 'large': 'hat_net_large'}


@lru_cache(maxsize=None)
def official_reference() -> dict:
    """The bundled fixture: official state_dict manifests, parameter counts and reference logits."""
    text = resources.files('hatnet').joinpath('reference/hatnet_official_reference.json').read_text()
    return json.loads(text)


def reference_state_dict(variant: str, weight_seed: int, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """The deterministic stand-in checkpoint, in the original key layout (see the fixture's weight_rule)."""
    state = {}
    for key, shape in official_reference()['manifests'][variant]:
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()) + weight_seed)
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) == 1 and key.endswith('.weight'):
            t = 1.0 + 0.2 * t
        elif key.endswith('.bias'):
            t = 0.2 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        state[key] = t.to(dtype)
    return state


def reference_input(shape: Sequence[int], input_seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(input_seed)
    return torch.randn(list(shape), generator=generator, dtype=torch.float64).to(dtype)


def reference_model(variant: str, weight_seed: int, dtype=torch.float32) -> torch.nn.Module:
    """A hat_net model carrying the stand-in weights, mapped from the original layout by checkpoint_filter_fn."""
    model = timm.create_model(VARIANT_NAMES[variant], device='meta')  # no time spent on random init
    state_dict = checkpoint_filter_fn(reference_state_dict(variant, weight_seed, dtype), model)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def self_check(cases: Sequence[dict] = ()) -> List[dict]:
    """Run each fixture case in float32 eval mode; return the max |logit difference| per case."""
    results = []
    for case in cases or official_reference()['cases']:
        model = reference_model(case['variant'], case['weight_seed'])
        x = reference_input(case['input_shape'], case['input_seed'])
        with torch.inference_mode():
            logits = model(x)
        expected = torch.tensor(case['logits'], dtype=torch.float64)
        results.append(dict(
            variant=case['variant'], input_shape=tuple(case['input_shape']), weight_seed=case['weight_seed'],
            max_abs_diff=(logits.double() - expected).abs().max().item()))
    return results
