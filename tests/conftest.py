import json
from pathlib import Path

import pytest
import torch

import hatnet  # noqa: F401  (registers the hat_net models in timm)

DATA = Path(__file__).parent / 'data'


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def original_extra_cases():
    """Further outputs of the original implementation (other variants, seeds, batch sizes, sizes)."""
    return json.loads((DATA / 'original_extra_cases.json').read_text())['cases']
