"""Command-line options generated from dataclass fields.

The settings of a run are declared once, as dataclass fields with their help text (``metadata['help']``) and
help panel (``metadata['group']``): :class:`hatnet.engine.TrainConfig` for the trainer, a task's config for
the task. :func:`settings_command` turns such fields into a typer command: typer reads the parameters from
the function's ``__signature__``, which is built here, one ``typer.Option`` per field.

Every option defaults to None, which means "not given": the recipe, a resumed run's config.yaml or the
dataclass default then applies (:func:`hatnet.engine.resolve_config`). Types follow the fields: int, float
and str options, ``--x/--no-x`` flags for bools, comma-separated values for lists.
"""
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Mapping, Optional, Sequence

import typer
import yaml

from ..engine.config import RUN as RUN_PANEL
from ..errors import HatNetError
from ..models.runtime import check_amp


def comma_list(text: Optional[str]) -> Optional[List[str]]:
    """'a, b,c' -> ['a', 'b', 'c']; None stays None."""
    return None if text is None else [part.strip() for part in text.split(',') if part.strip()]


def _parse_settings(values: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``--set KEY=VALUE`` options -> {key: value}, each value read as YAML (numbers, true/false, [lists])."""
    settings = {}
    for item in values or ():
        key, sep, text = item.partition('=')
        if not (sep and key.strip()):
            raise typer.BadParameter(f'expected KEY=VALUE, got {item!r}', param_hint='--set')
        try:
            settings[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise typer.BadParameter(f'{key}: {text!r} is not a YAML value', param_hint='--set') from None
    return settings


def _option_type(type_: Any) -> Any:
    """The type typer parses for a field's annotation (Optional[X] -> X; lists are given as one string)."""
    if typing.get_origin(type_) is typing.Union:
        type_ = next(a for a in typing.get_args(type_) if a is not type(None))
    if typing.get_origin(type_) in (list, tuple):
        return list
    return type_ if type_ in (bool, int, float) else str


def field_options(
        cls: type,
        names: Optional[Sequence[str]] = None,
        panel: str = '',
        help: Optional[Mapping[str, str]] = None,
        aliases: Optional[Mapping[str, Sequence[str]]] = None,
) -> List[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option(None, ...)`` default per field of ``cls`` (or per name in
    ``names``, in that order). Help: the field's ``metadata['help']``, else ``help[name]``; panel: its
    ``metadata['group']``, else ``panel``; ``aliases[name]``: further option names, e.g. ``('--drop-path',)``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    parameters = []
    for name in fields if names is None else names:
        if name not in fields:
            raise ValueError(f'{cls.__name__} has no field {name!r}')
        type_ = _option_type(hints[name])
        metadata = fields[name].metadata
        flag = '--' + name.replace('_', '-')
        extra = (aliases or {}).get(name, ())
        text = metadata.get('help') or (help or {}).get(name, '')
        callback = None
        if type_ is bool:  # --x/--no-x: not given (None), True or False
            declarations = [f'{o}/--no-{o[2:]}' for o in (flag, *extra)]
        else:
            declarations = [flag, *extra]
        if type_ is list:
            type_, callback, text = str, comma_list, f'{text} (comma-separated)'.strip()
        option = typer.Option(None, *declarations, help=text, callback=callback,
                              rich_help_panel=metadata.get('group', panel), show_default=False)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[type_]))
    return parameters


def settings_command(
        run: Callable[[Dict[str, Any], Optional[str]], Any],
        parameters: Sequence[inspect.Parameter],
        doc: str,
        recipe_help: str = 'A bundled recipe or a YAML file; options given here override it.',
) -> Callable:
    """A typer command with ``parameters`` (see :func:`field_options`) plus ``--recipe`` and a repeatable
    ``--set KEY=VALUE``. It calls ``run(options, recipe)``: ``options`` maps the given settings to their values
    (``--set`` ones first, named options override them), ready for :func:`hatnet.engine.resolve_config`, which
    also rejects unknown keys."""
    common = [
        inspect.Parameter('recipe', inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
            None, help=recipe_help, rich_help_panel=RUN_PANEL, show_default=False)),
        inspect.Parameter('settings', inspect.Parameter.KEYWORD_ONLY, annotation=Optional[List[str]],
                          default=typer.Option(
                              None, '--set', metavar='KEY=VALUE', show_default=False,
                              rich_help_panel=RUN_PANEL, help='Any setting of the recipe (the trainer\'s or the '
                                                              'task\'s), the value read as YAML, e.g. --set '
                                                              'decay_milestones=[8,11]; repeatable.')),
    ]

    def command(**given) -> Any:
        recipe, options = given.pop('recipe'), _parse_settings(given.pop('settings'))
        options.update({name: value for name, value in given.items() if value is not None})
        return run(options, recipe)

    command.__signature__ = inspect.Signature([*parameters, *common])
    command.__doc__ = doc
    return command


def _checked_amp(value: str) -> str:
    try:
        check_amp(value)
    except HatNetError as e:
        raise typer.BadParameter(str(e)) from None
    return value


# the --amp option of the commands that predict and evaluate (checked before anything is read)
AmpOption = Annotated[str, typer.Option(
    callback=_checked_amp,
    help='none | bf16 | fp16: run the model under autocast in that dtype, as training does with --amp (bf16 is '
         'faster on CPUs with AVX-512-BF16 or AMX and on CUDA; outputs differ slightly from float32).')]


# the options of ``seg shapes`` and ``det shapes`` (hatnet.data.shapes draws the scenes of both)
ShapesOut = Annotated[Path, typer.Argument(help='Output folder (must not exist or be empty).')]
ShapesTrain = Annotated[int, typer.Option(min=1, help='Training images.')]
ShapesVal = Annotated[int, typer.Option(min=1, help='Validation images.')]
ShapesMinSize = Annotated[int, typer.Option(min=32, help='Smallest image side.')]
ShapesMaxSize = Annotated[int, typer.Option(min=32, help='Largest image side.')]
ShapesMax = Annotated[int, typer.Option(min=1, help='Most shapes per image.')]
ShapesSeed = Annotated[int, typer.Option(help='Random seed.')]


def check_new_dataset_folder(out: Path, min_size: int, max_size: int) -> None:
    """What ``seg shapes`` and ``det shapes`` refuse: an output that is not an empty folder, sizes out of order."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HatNetError(f'{out} already exists and is not an empty folder; not writing into it')
    if max_size < min_size:
        raise HatNetError(f'--max-size {max_size} is smaller than --min-size {min_size}')
