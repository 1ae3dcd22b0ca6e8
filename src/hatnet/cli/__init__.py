"""``hatnet`` command line: thin wrappers that parse options, call the library and print results.

Commands are grouped by task (``hatnet cls|seg|det train|eval|predict``); the classification ones are also
top-level (``hatnet train`` is ``hatnet cls train``).
"""
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import HatNetError
from ..models.runtime import flush_denormals
from . import bench, classify, det, export, model_cmds, seg, serve, train  # noqa: F401  (each module registers its commands)
from .app import app, cls_app

try:  # typer >= 0.20 carries its own copy of click, whose exceptions derive from this
    from typer import TyperException as USAGE_ERRORS
except ImportError:
    from click import ClickException as USAGE_ERRORS


# hatnet cls eval | predict | attention | demo: the top-level classification commands, also under cls
cls_app.registered_commands += [c for c in app.registered_commands if c.callback.__module__ == classify.__name__]


def _error(message: str) -> None:
    """Bad input: one line naming the problem, no traceback, exit status 2."""
    Console(stderr=True).print(f'[bold red]error:[/] {escape(message)}', highlight=False, soft_wrap=True)
    sys.exit(2)


def main(argv=None) -> None:
    # first, before any operator starts PyTorch's worker threads: they inherit the mode only when they start
    flush_denormals()
    # a warning is one line, as the command's other messages are (not the Python source it was raised in)
    python_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f'warning: {message}\n'
    try:
        _run(argv)
    finally:
        warnings.formatwarning = python_format


def _run(argv) -> None:
    try:
        # the command line's own errors (an unknown option, a value of the wrong type) come here too, to be one line
        code = app(args=argv, prog_name='hatnet', standalone_mode=False)
    except USAGE_ERRORS as e:
        if type(e).__name__ == 'NoArgsIsHelpError':  # a group called without a command: its help
            e.show()
            sys.exit(e.exit_code)
        context = getattr(e, 'ctx', None)
        _error(e.format_message() + (f' (see {context.command_path} --help)' if context is not None else ''))
    except typer.Abort:
        print('Aborted!', file=sys.stderr)
        sys.exit(1)
    except HatNetError as e:
        _error(str(e))
    sys.exit(code if isinstance(code, int) else 0)
