"""The command line's layout: train options generated from the settings, --set, task groups, aliases, extras."""
import dataclasses
import inspect
import subprocess
import sys
from typing import List, Optional

import pytest
import typer
import yaml
from typer.testing import CliRunner

from hatnet.cli import app, main
from hatnet.cli.app import cls_app
from hatnet.cli.options import field_options, settings_command
from hatnet.cli.train import cls_train, det_train, recipe_for, seg_train
from hatnet.engine import TrainConfig
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)

TRAINER_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def hatnet(*args):
    """``hatnet ARGS`` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def option_names(*path) -> set:
    """The option names of ``hatnet PATH``, as click sees them."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {name for param in command.params for name in param.opts + param.secondary_opts}


def test_every_train_command_offers_every_trainer_setting():
    for command in (cls_train, seg_train, det_train):
        assert set(TRAINER_FIELDS) <= set(inspect.signature(command).parameters)
    cls, seg, det = (option_names(task, 'train') for task in ('cls', 'seg', 'det'))
    trainer_options = {'--' + name.replace('_', '-') for name in TRAINER_FIELDS} | {'--recipe', '--set'}
    assert trainer_options <= cls & seg & det
    assert {'--no-ema', '--resume', '--overwrite'} <= cls & seg & det
    # the task settings the tasks share are spelt alike, today's spellings kept as aliases
    assert {'--data', '--model', '--pretrained', '--drop-path-rate', '--drop-path'} <= cls & seg & det
    assert {'--frozen-stages', '--freeze-stages', '--val-split'} <= cls & det
    assert {'--aa', '--mixup'} <= cls and {'--crop-size', '--layout'} <= seg and {'--arch', '--multi-scale'} <= det


def test_top_level_classification_commands_are_the_cls_ones():
    top = {info.name or info.callback.__name__: info.callback for info in app.registered_commands}
    cls = {info.name or info.callback.__name__: info.callback for info in cls_app.registered_commands}
    assert set(cls) >= {'train', 'eval', 'predict', 'attention', 'demo'}
    assert all(top[name] is callback for name, callback in cls.items())
    code, out, _ = hatnet('cls', 'train', '--help')
    top_code, top_out, _ = hatnet('train', '--help')
    assert code == top_code == 0 and '--drop-path' in out
    assert ' '.join(out.replace('hatnet cls train', 'hatnet train').split()) == ' '.join(top_out.split())
    for name in ('eval', 'predict', 'attention', 'demo'):
        assert option_names('cls', name) == option_names(name)
    assert {'seg', 'det', 'cls', 'export', 'bench'} <= set(typer.main.get_command(app).commands)


def test_set_reaches_the_trainer(tmp_path):
    code, _, err = hatnet('cls', 'train', '--data', 'digits', '--iters', 1, '--batch-size', 8, '--eval-batch-size',
                          180, '--out', tmp_path / 'run', '--set', 'lr=0.5', '--set', 'decay_milestones=[2,3]',
                          '--set', 'mixup=0.2')
    assert code == 0, err
    config = yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())
    assert (config['lr'], config['decay_milestones'], config['mixup']) == (0.5, [2, 3], 0.2)
    assert (config['iters'], config['batch_size'], config['img_size']) == (1, 8, 32)  # options and the digits recipe


def test_unknown_setting_is_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['cls', 'train', '--data', 'digits', '--iters', '1', '--out', str(tmp_path / 'run'), '--set', 'foo=1'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "'foo'" in err[0]
    assert not (tmp_path / 'run').exists()


def test_default_recipe_of_each_task():
    assert recipe_for('cls', None, {}) == ('digits', {'paper': 'imagenet_paper'})
    assert recipe_for('cls', None, {'data': '/data/flowers'})[0] is None
    # the dense tasks start from 'auto': the paper's recipe fitted to the data
    assert recipe_for('seg', None, {}) == ('auto', {'paper': 'ade20k_semantic_fpn', 'auto': 'ade20k_semantic_fpn'})
    assert recipe_for('det', None, {'arch': 'maskrcnn'}) == ('auto', {'paper': 'coco_maskrcnn_1x',
                                                                      'auto': 'coco_maskrcnn_1x'})
    assert recipe_for('det', 'paper', {})[0] == 'paper'
    assert recipe_for('det', 'mine.yaml', {})[0] == 'mine.yaml'
    assert recipe_for('seg', None, {'resume': True})[0] is None  # the run's own config.yaml


@dataclasses.dataclass
class Settings:
    size: int = dataclasses.field(default=3, metadata=dict(help='Side.', group='shape'))
    scale: Optional[float] = None
    name: str = 'x'
    flip: bool = False
    steps: List[int] = dataclasses.field(default_factory=list)


def test_generated_options_follow_the_fields():
    given = []
    command = settings_command(lambda options, recipe: given.append((options, recipe)),
                               field_options(Settings, aliases={'size': ('-s',)}), 'Try the options.')
    assert list(inspect.signature(command).parameters) == ['size', 'scale', 'name', 'flip', 'steps', 'recipe',
                                                           'settings']
    test_app = typer.Typer()
    test_app.command()(command)
    test_app.command('other')(lambda: None)  # a group, so that the command is called by its name
    runner = CliRunner()
    result = runner.invoke(test_app, ['command', '-s', '5', '--no-flip', '--steps', '2, 4', '--set', 'name=[a]'])
    assert result.exit_code == 0, result.output
    assert given.pop() == ({'name': ['a'], 'size': 5, 'flip': False, 'steps': ['2', '4']}, None)
    assert runner.invoke(test_app, ['command', '--recipe', 'r.yaml']).exit_code == 0
    assert given.pop() == ({}, 'r.yaml')  # nothing given: the recipe and the defaults apply
    assert runner.invoke(test_app, ['command', '--size', 'big']).exit_code == 2
    assert runner.invoke(test_app, ['command', '--set', 'size']).exit_code == 2
    help_text = runner.invoke(test_app, ['command', '--help']).output
    assert 'Side.' in help_text and 'shape' in help_text and '--no-flip' in help_text


HEAVY = ('sklearn', 'onnx', 'onnxruntime', 'pycocotools', 'faster_coco_eval', 'matplotlib')


def test_the_backbone_imports_no_task_tools():
    code = f'import sys, hatnet, hatnet.models; print([m for m in {HEAVY!r} if m in sys.modules])'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == '[]'


def test_a_missing_extra_is_one_line_naming_it():
    code = ("import sys; sys.modules['pycocotools'] = None\n"
            "from hatnet.cli import main; main(['det', 'train', '--arch', 'maskrcnn', '--data', 'coco'])")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: this command needs pycocotools, which is not installed: pip install 'hatnet[det]'"]


def test_loading_a_task_without_its_extra_names_the_extra():
    code = ("import sys; sys.modules['pycocotools'] = None\n"
            "from hatnet.tasks import get_task\n"
            "try:\n    get_task('detection')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == \
        "HatNetError the detection task needs pycocotools, which is not installed: pip install 'hatnet[det]'"
