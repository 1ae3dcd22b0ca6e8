"""``hatnet`` command line: thin wrappers that parse options, call the library and print results.

Commands are grouped by task (``hatnet cls|seg|det train|eval|predict``); the classification ones are also
top-level (``hatnet train`` is ``hatnet cls train``).
"""
import sys

from rich.console import Console
from rich.markup import escape

from ..errors import HatNetError
from . import bench, classify, det, export, model_cmds, seg, train  # noqa: F401  (each module registers its commands)
from .app import app, cls_app


# hatnet cls eval | predict | attention | demo: the top-level classification commands, also under cls
cls_app.registered_commands += [c for c in app.registered_commands if c.callback.__module__ == classify.__name__]


def main(argv=None) -> None:
    try:
        app(args=argv, prog_name='hatnet')
    except HatNetError as e:
        # bad input: one line naming the problem, no traceback
        Console(stderr=True).print(f'[bold red]error:[/] {escape(str(e))}', highlight=False, soft_wrap=True)
        sys.exit(2)
