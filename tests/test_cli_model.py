import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hatnet.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_variants_and_passes_the_self_check():
    result = CliRunner().invoke(app, ['info'], env={'COLUMNS': '200'})
    assert result.exit_code == 0, result.output
    for name, params in [('hat_net_tiny', '12,655,912'), ('hat_net_small', '25,747,784'),
                         ('hat_net_medium', '42,942,472'), ('hat_net_large', '63,132,488')]:
        assert name in result.output and params in result.output
    # GMACs at 224 as the paper counts them: 2.0 / 4.3 / 8.3 / 11.5
    for gmacs in ('1.99', '4.32', '8.35', '11.51'):
        assert gmacs in result.output
    assert result.output.count('pass') == 2 and 'FAIL' not in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / 'notes.pth').write_text('these are not weights')
    result = subprocess.run([sys.executable, '-m', 'hatnet', 'convert', str(tmp_path / 'notes.pth'),
                             str(tmp_path / 'out.safetensors')], capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS='300'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'error: {tmp_path / "notes.pth"} is not a PyTorch checkpoint '
                                                  f'(.pth) or safetensors file']
    assert not (tmp_path / 'out.safetensors').exists()


@pytest.mark.slow
def test_timm_own_model_tests_pass():
    """timm's tests/test_models.py, everything it runs for pvt_v2, run for hat_net (needs PyPI for the sdist)."""
    result = subprocess.run(['bash', str(ROOT / 'tools/timm_conformance/run.sh'), '-q'], capture_output=True,
                            text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r'^52 passed', result.stdout, re.MULTILINE)
