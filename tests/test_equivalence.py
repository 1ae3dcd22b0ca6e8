"""hat_net models compute what the original HAT-Net code computes, for the same (original-layout) weights."""
import math
import zlib

import pytest
import timm
import torch

from hatnet.models import VARIANT_ARGS, remap_original_keys
from hatnet.reference import VARIANT_NAMES, official_reference, reference_state_dict, self_check

from conftest import original_extra_cases

TOLERANCE = 1e-4
FIXTURE_CASES = official_reference()['cases']
ALL_CASES = FIXTURE_CASES + original_extra_cases()


def _case_id(case):
    return f"{case['variant']}-w{case['weight_seed']}-{'x'.join(map(str, case['input_shape']))}"


def test_cases_cover_every_variant_and_non_square_sizes():
    assert {c['variant'] for c in ALL_CASES} == set(VARIANT_NAMES)
    assert any(c['input_shape'][2] != c['input_shape'][3] for c in ALL_CASES)
    assert any(c['input_shape'][0] > 1 for c in ALL_CASES)


@pytest.mark.parametrize('case', ALL_CASES, ids=_case_id)
def test_logits_match_original(case):
    (result,) = self_check([case])
    assert result['max_abs_diff'] <= TOLERANCE


def test_weight_rule_follows_the_fixture_text():
    """The stand-in weights are built exactly as the fixture's weight_rule describes."""
    state = reference_state_dict('tiny', weight_seed=3, dtype=torch.float64)
    manifest = official_reference()['manifests']['tiny']
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, s) for k, s in manifest]
    for key, kind in [('blocks.0.0.attn.norm.weight', 'norm'), ('blocks.0.0.attn.qkv.bias', 'bias'),
                      ('blocks.2.1.conv.conv2.0.weight', 'other')]:
        shape = dict(manifest)[key]
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + 3)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        expected = {'norm': 1 + 0.2 * t, 'bias': 0.2 * t, 'other': t / math.sqrt(math.prod(shape[1:]))}[kind]
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0)


@pytest.mark.parametrize('variant', list(VARIANT_NAMES))
def test_parameter_counts_are_the_published_ones(variant):
    model = timm.create_model(VARIANT_NAMES[variant], device='meta')
    expected = {'tiny': 12_655_912, 'small': 25_747_784, 'medium': 42_942_472, 'large': 63_132_488}[variant]
    assert sum(p.numel() for p in model.parameters()) == expected == official_reference()['official_param_counts'][variant]


@pytest.mark.parametrize('variant', list(VARIANT_NAMES))
def test_original_layout_maps_one_to_one_onto_ours(variant):
    """Every original weight has exactly one place in our layout, with the same shape, and nothing is left over."""
    manifest = official_reference()['manifests'][variant]
    ours = timm.create_model(VARIANT_NAMES[variant], device='meta').state_dict()
    remapped = remap_original_keys({k: torch.empty(s, device='meta') for k, s in manifest})
    assert len(remapped) == len(manifest)
    assert {k: tuple(v.shape) for k, v in remapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_variant_table_matches_entrypoints():
    for name, args in VARIANT_ARGS.items():
        model = timm.create_model(name, device='meta')
        assert [s.blocks[0].attn.qkv.in_channels for s in model.stages] == list(args['embed_dims'])
        assert [len(s.blocks) for s in model.stages] == list(args['depths'])
