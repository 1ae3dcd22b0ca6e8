"""The docs cannot rot: every ``hatnet`` command in README.md and docs/ parses against the command line as it
is, every Python block compiles, and (slow) every runnable block runs.

A block that cannot run here -- it needs ImageNet, COCO, ADE20K, a GPU or the original weights -- carries an
explicit marker on the line before it: ``<!-- docs-test: skip (the reason) -->``. Every other bash and python
block of a page runs, in order, in one scratch folder per page (a page's later blocks use what its earlier
ones made), with ``hatnet`` and ``python`` from this environment.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest
import typer.main

from hatnet.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```(\w*)\n(.*?)^```', re.S | re.M)
SKIP = re.compile(r'<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->\s*$')
HATNET = re.compile(r'^(?:\S*/)?hatnet$')


class Block(NamedTuple):
    page: Path
    line: int
    language: str
    code: str
    skip: str  # the reason given by the marker, '' for a block that runs


def blocks(page: Path) -> List[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count('\n', 0, match.start()) + 1
        before = text[:match.start()].rstrip('\n').rsplit('\n', 1)[-1]
        marker = SKIP.search(before)
        found.append(Block(page, line, match.group(1), match.group(2), marker.group(1) if marker else ''))
    return found


def hatnet_commands(code: str) -> List[List[str]]:
    """The argument lists of the ``hatnet`` invocations in a bash block (``hatnet ...``, ``.venv/bin/hatnet``,
    ``python -m hatnet``, ``torchrun ... -m hatnet``), continuation lines joined, comments dropped."""
    commands = []
    for line in code.replace('\\\n', ' ').splitlines():
        words = shlex.split(line, comments=True)
        segment: List[str] = []
        for word in words + ['&&']:
            if word in ('&&', '||', ';', '|'):
                commands += _hatnet_arguments(segment)
                segment = []
            else:
                segment.append(word)
    return commands


def _hatnet_arguments(words: List[str]) -> List[List[str]]:
    for i, word in enumerate(words):
        if HATNET.match(word):
            return [words[i + 1:]]
        if word == '-m' and i + 1 < len(words) and words[i + 1] == 'hatnet':
            return [words[i + 2:]]
    return []


def parse(arguments: List[str]) -> None:
    """Parse ``arguments`` as the command line does (commands, options, value types), without running."""
    command = typer.main.get_command(app)
    context = command.make_context('hatnet', list(arguments))
    while hasattr(command, 'get_command') and (_protected(context) or context.args):
        name, *rest = [*_protected(context), *context.args]
        command = command.get_command(context, name)
        assert command is not None, f'no command {name!r}'
        context = command.make_context(name, rest, parent=context)


def _protected(context) -> List[str]:
    """A group's subcommand and its arguments (``_protected_args`` in newer click)."""
    return list(getattr(context, '_protected_args', None) or getattr(context, 'protected_args', None) or [])


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
BASH = [b for b in ALL_BLOCKS if b.language in ('bash', 'sh')]


@pytest.mark.parametrize('block', BASH, ids=lambda b: f'{b.page.name}:{b.line}')
def test_every_documented_command_parses(block):
    for arguments in hatnet_commands(block.code):
        if '--help' in arguments:
            continue
        try:
            parse(arguments)
        except Exception as e:  # click's UsageError and typer's copy of it
            pytest.fail(f'{block.page.name}:{block.line}: hatnet {" ".join(arguments)}: {e}')


@pytest.mark.parametrize('block', [b for b in ALL_BLOCKS if b.language == 'python'],
                         ids=lambda b: f'{b.page.name}:{b.line}')
def test_every_python_block_compiles(block):
    compile(block.code, f'{block.page.name}:{block.line}', 'exec')


def test_the_parser_finds_commands_and_rejects_stale_ones():
    code = 'hatnet seg shapes out/ && .venv/bin/hatnet info  # note\npython -m hatnet train \\\n  --epochs 2\n'
    assert hatnet_commands(code) == [['seg', 'shapes', 'out/'], ['info'], ['train', '--epochs', '2']]
    for stale in (['train', '--no-such-option', '1'], ['seg', 'no-such-command'], ['train', '--epochs', 'two']):
        with pytest.raises(Exception):
            parse(stale)


@pytest.mark.slow
@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_runnable_block_runs(page, tmp_path):
    runnable = [b for b in blocks(page) if b.language in ('bash', 'sh', 'python') and not b.skip]
    if not runnable:
        pytest.skip(f'{page.name} has no runnable block')
    bin_dir = Path(sys.executable).parent
    (tmp_path / '.venv').symlink_to(Path(sys.prefix))  # '.venv/bin/hatnet' as the docs write it
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', PYTHONPATH=str(ROOT / 'src'))
    for block in runnable:
        command = [sys.executable, '-c', block.code] if block.language == 'python' else \
            ['bash', '-e', '-o', 'pipefail', '-c', block.code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, (f'{page.name}:{block.line} exited {result.returncode}\n'
                                        f'{result.stdout[-2000:]}\n{result.stderr[-3000:]}')
