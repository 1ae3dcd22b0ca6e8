import json
import os
from pathlib import Path

import pytest
import torch

import hatnet  # noqa: F401  (registers the hat_net models in timm)

DATA = Path(__file__).parent / 'data'


def pytest_configure(config):
    # pytest-xdist workers run side by side: each takes its share of the cores instead of all of them
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def original_extra_cases():
    """Further outputs of the original implementation (other variants, seeds, batch sizes, sizes)."""
    return json.loads((DATA / 'original_extra_cases.json').read_text())['cases']
