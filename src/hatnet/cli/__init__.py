"""``hatnet`` command line: thin wrappers that parse options, call the library and print results."""
import sys

from rich.console import Console

from ..errors import HatNetError
from . import bench, classify, det, model_cmds, seg  # noqa: F401  (each module registers its commands)
from .app import app


def main(argv=None) -> None:
    try:
        app(args=argv, prog_name='hatnet')
    except HatNetError as e:
        # bad input: one line naming the problem, no traceback
        Console(stderr=True).print(f'[bold red]error:[/] {e}', highlight=False, soft_wrap=True)
        sys.exit(2)
