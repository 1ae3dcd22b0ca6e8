"""``hatnet cls train``, ``hatnet seg train``, ``hatnet det train``: one trainer, one set of options.

Each command offers every trainer setting (:class:`hatnet.engine.TrainConfig`) and its task's main settings
under the same option names, generated from the dataclass fields (``options.py``); every other setting of a
recipe is reachable with ``--set KEY=VALUE``. ``hatnet train`` is ``hatnet cls train``.
"""
import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from rich.text import Text

from ..engine.config import TrainConfig
from ..engine.fitting import Choice
from ..errors import HatNetError
from ..extras import EXTRA_OF, import_optional, require
from .app import app, cls_app, console, det_app, seg_app
from .options import field_options, settings_command

DATA_PANEL, AUG_PANEL = 'data and model', 'augmentation'
AUGMENTATION = ('aa', 'reprob', 'mixup', 'cutmix', 'smoothing')

# Task settings that every task having them offers under one name (older spellings stay as aliases).
SHARED_FIELDS = ('data', 'model', 'pretrained', 'num_classes', 'frozen_stages', 'drop_path_rate', 'train_split',
                 'val_split')
ALIASES = {'drop_path_rate': ('--drop-path',), 'frozen_stages': ('--freeze-stages',)}
SHARED_HELP = {
    'model': 'hat_net_{tiny,small,medium,large} or any timm model.',
    'pretrained': 'Weights to start from: an original HAT-Net .pth, a hatnet .safetensors / .pth, a classification '
                  'run directory or a timm checkpoint.',
    'num_classes': '(default: read from the data)',
    'frozen_stages': 'Freeze the stem and the first N stages.',
    'drop_path_rate': 'Stochastic depth.',
    'train_split': 'Training split.',
    'val_split': 'Validation split.',
}


@dataclass(frozen=True)
class TrainCommand:
    """What differs between the ``train`` commands of the tasks."""
    task: str                       # cls | seg | det
    module: str                     # holds the task's config dataclass and Task class
    config: str
    job: str
    fields: Dict[str, str]          # the task's own settings offered as options (besides SHARED_FIELDS): help
    needs: Tuple[str, ...]          # optional packages its training uses besides its module's imports
    doc: str
    recipe_help: str


TRAIN_NEEDS = ('matplotlib',)  # the curves every run draws
CLASSIFICATION = TrainCommand(
    task='cls', module='hatnet.tasks.classification', config='ClassificationConfig', job='ClassificationTask',
    fields=dict(data="ImageFolder root with train/ and val/, or 'digits' (embedded, no download).",
                img_size="(default: the model's, 32 for the digits)",
                aa='RandAugment policy, e.g. rand-m9-mstd0.5-inc1.', reprob='RandomErasing probability.',
                mixup='Mixup alpha (0: off).', cutmix='CutMix alpha (0: off).', smoothing='Label smoothing.'),
    needs=TRAIN_NEEDS + ('sklearn',),
    doc='Train a classifier (the one trainer: resumable, distributed with torchrun, see docs/training.md).',
    recipe_help="'paper' (ImageNet, the paper's), 'digits' (the default for the digits), another bundled recipe "
                "or a YAML file; options given here override it.")
SEGMENTATION = TrainCommand(
    task='seg', module='hatnet.tasks.segmentation', config='SegmentationConfig', job='SegmentationTask',
    fields=dict(data='Dataset folder (see --layout).',
                layout='ade20k: images/ and annotations/{training,validation}; folders: images/ and '
                       'masks/{train,val} with class-index PNGs and an optional classes.yaml.',
                crop_size='Training crop side.', short_side='Test scale; training scales are short_side x ratio_range.',
                head='fpn (Semantic FPN, the paper\'s) or unet (a U-Net decoder).', norm='Head norm: gn | bn.'),
    needs=TRAIN_NEEDS + ('torchmetrics',),
    doc="Train a segmentation model: Semantic FPN with the paper's ADE20K recipe fitted to the data (a U-Net decoder "
        "for a backbone from scratch) unless --recipe says otherwise; options override it.\n\n"
        'The one trainer: resumable, distributed with torchrun (--batch-size is per process), see docs/training.md.',
    recipe_help="'auto' (the default: the paper's recipe with image scale, schedule, batch and lr fitted to the "
                "data and the machine, printed at the start), 'paper' (ade20k_semantic_fpn as published), another "
                "bundled recipe or a YAML file; options given here override it.")
DETECTION = TrainCommand(
    task='det', module='hatnet.tasks.detection', config='DetectionConfig', job='DetectionTask',
    fields=dict(data='Dataset folder in the COCO 2017 layout.',
                arch='retinanet (object detection) or maskrcnn (instance segmentation).',
                min_size='Shorter image side (inference; training unless --multi-scale).',
                max_size='Cap on the longer image side.',
                multi_scale='Training: shorter sides to draw from, e.g. 640,672,704,736,768,800.'),
    needs=TRAIN_NEEDS,
    doc="Train RetinaNet or Mask R-CNN with a HAT-Net backbone (PVT's 1x COCO recipe by default).",
    recipe_help="'auto' (the default: the paper's recipe with image scale, schedule, batch and lr fitted to the "
                "data and the machine, printed at the start), 'paper' (coco_ARCH_1x as published), another bundled "
                "recipe or a YAML file; options given here override it.")

def recipe_for(task: str, recipe: Optional[str], options: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, str]]:
    """The recipe a ``train`` command starts from, and what ``paper`` and ``auto`` mean for the task.

    Without ``--recipe``: classification on the digits (its default data) uses ``digits``, on other data none
    (the dataclass defaults); segmentation and detection use ``auto``: the paper's recipe (ADE20K Semantic FPN,
    the arch's 1x COCO) fitted to the data (``engine/fitting.py``). A resumed run uses its own config.yaml.
    """
    if task == 'cls':
        paper = 'imagenet_paper'
        default = 'digits' if (options.get('data') or 'digits') == 'digits' else None
        aliases = {'paper': paper}
    else:
        paper = 'ade20k_semantic_fpn' if task == 'seg' else f'coco_{options.get("arch") or "retinanet"}_1x'
        default, aliases = 'auto', {'paper': paper, 'auto': paper}
    if recipe is None and not options.get('resume'):
        recipe = default
    return recipe, aliases


def fit_to_data(module, train_cfg, task_cfg, given) -> List[Choice]:
    """The ``auto`` recipe's choices for this data and machine (applied to the configs, user's options kept)."""
    from ..engine.distributed import resolve_device
    from ..engine.fitting import apply_choices, launched_processes, machine_choices

    device = resolve_device(train_cfg.device)
    choices = machine_choices(train_cfg, device, launched_processes(local=True))
    fit_recipe = getattr(module, 'fit_recipe', None)  # a task's own fitting to its data, if it has one
    if fit_recipe is not None:
        choices += fit_recipe(task_cfg, train_cfg, frozenset(given), device)
    return apply_choices(train_cfg, task_cfg, choices, given)


def default_run_dir(task: str, config: Any) -> Path:
    """runs/MODEL-DATA for classification, runs/seg-MODEL-DATA, runs/ARCH-MODEL-DATA for detection."""
    prefix = '' if task == 'cls' else 'seg-' if task == 'seg' else f'{config.arch}-'
    return Path('runs') / f'{prefix}{config.model}-{Path(config.data).name}'


def run_training(spec: TrainCommand, options: Dict[str, Any], recipe: Optional[str]) -> None:
    """What every ``train`` command does with the options it was given."""
    require(*spec.needs)
    from ..engine import check_config, resolve_config, train

    module = import_optional(spec.module, 'this command')
    recipe, aliases = recipe_for(spec.task, recipe, options)
    train_cfg, task_cfg = resolve_config(getattr(module, spec.config), options, recipe, aliases)
    if not task_cfg.data:
        raise HatNetError('no dataset given: pass --data DIR')
    if not train_cfg.out:
        train_cfg.out = str(default_run_dir(spec.task, task_cfg))
    if not (train_cfg.epochs or train_cfg.iters):
        raise HatNetError('give the length of the run: --epochs N (or --iters N), or a --recipe')
    # every option, before the data and the weights are read (the task checks its own when it is made)
    check_config(train_cfg)
    job = getattr(module, spec.job)(task_cfg)
    choices = []
    if recipe == 'auto':
        choices = fit_to_data(module, train_cfg, task_cfg, options)
        job = getattr(module, spec.job)(task_cfg)  # made again from the fitted settings
    if hasattr(job, 'check_inputs'):
        job.check_inputs()  # the data and weights, before the run directory is touched
    result = train(job, train_cfg, choices)
    if int(os.environ.get('RANK', '0')) == 0:  # torchrun starts every rank with the same command
        best = result['best']
        console().print(Text.assemble(f'best val_{best["metric"]} ', (f'{best["value"]:.4f}', 'bold'),
                                      f' -> {result["run_dir"]}/best.pth'))


def train_command(spec: TrainCommand, *apps) -> Callable:
    """The ``train`` command of a task, registered on ``apps``."""
    try:
        config = getattr(importlib.import_module(spec.module), spec.config)
    except ModuleNotFoundError as e:
        if (e.name or '').split('.')[0] not in EXTRA_OF:
            raise
        config = None  # the command then only names the extra to install
    parameters = []
    if config is not None:
        names = {f.name for f in dataclasses.fields(config)}
        help = dict(SHARED_HELP, **spec.fields)
        shared = [n for n in SHARED_FIELDS if n in names]
        own = [n for n in spec.fields if n not in shared and n not in AUGMENTATION]
        augmentation = [n for n in spec.fields if n in AUGMENTATION]
        parameters += field_options(config, shared + own, DATA_PANEL, help, ALIASES)
        parameters += field_options(config, augmentation, AUG_PANEL, help)
    parameters += field_options(TrainConfig)
    command = settings_command(lambda options, recipe: run_training(spec, options, recipe), parameters, spec.doc,
                               spec.recipe_help)
    # without the task's packages, any option is accepted so that the one error is the missing extra
    context = None if config is not None else dict(ignore_unknown_options=True, allow_extra_args=True)
    for typer_app in apps:
        typer_app.command('train', context_settings=context)(command)
    return command


cls_train = train_command(CLASSIFICATION, cls_app, app)  # hatnet train is hatnet cls train
seg_train = train_command(SEGMENTATION, seg_app)
det_train = train_command(DETECTION, det_app)
