"""A classification run as a Hugging Face-style model folder, written with timm's own ``save_for_hf``.

The folder holds ``config.json`` (the architecture, ``pretrained_cfg`` with the run's preprocessing, and the
class names as ``label_names``), ``model.safetensors`` and a model card ``README.md`` (data, recipe, metrics).
What reads it, offline::

    import hatnet, timm                        # hatnet registers the hat_net architectures with timm
    model = timm.create_model('local-dir:FOLDER', pretrained=True)
    from transformers import pipeline          # TimmWrapper: real class names, the run's preprocessing
    classify = pipeline('image-classification', model='FOLDER')

timm and transformers build the network from timm's registry of architectures, which has no way to import a
plugin by itself: ``import hatnet`` (which registers ``hat_net_*``) must come first in the process, and the
model card says so. For a timm architecture (e.g. a run of resnet18) nothing else is needed.
"""
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

import yaml

from ..errors import HatNetError
from ..fileio import writing

__all__ = ['save_hf_folder']

CARD_SETTINGS = ('model', 'data', 'pretrained', 'epochs', 'iters', 'batch_size', 'opt', 'lr', 'weight_decay',
                 'sched', 'img_size', 'drop_path_rate', 'amp', 'seed')


def save_hf_folder(run_or_checkpoint, folder, overwrite: bool = False) -> Path:
    """Write the classification run ``run_or_checkpoint`` (a run directory or one of its checkpoints) to
    ``folder``, which must not exist unless ``overwrite``. The folder appears complete or not at all."""
    from timm.models import save_for_hf

    from ..engine.checkpoint import load_weights
    from ..models.factory import create
    from ..tasks.predictor import read_run

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise HatNetError(f'{folder} exists already (pass --overwrite to replace it)')
    if folder.exists() and not folder.is_dir():
        raise HatNetError(f'{folder} is a file; give a folder for the model')
    run = read_run(run_or_checkpoint, 'classification')
    state = run.task_state
    model = create(state['model'], num_classes=state['num_classes']).eval()
    load_weights(model, run.state_dict, source=str(run.path))
    data_config = dict(state['data_config'])
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.', dir=folder.parent))
        try:
            save_for_hf(model, str(staging), model_config=dict(label_names=list(state['class_names'])),
                        safe_serialization=True, data_config=data_config)
            _fit_config_to_run(staging / 'config.json')
            (staging / 'README.md').write_text(model_card(state, run.config, run.metrics, str(run.path)))
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


# pretrained_cfg entries that describe the ImageNet weights of the architecture, not this run's model
IMAGENET_FACTS = ('tag', 'description', 'top1', 'hf_hub_id', 'url', 'file')


def _fit_config_to_run(path: Path) -> None:
    """Leave out of timm's config.json what would mislead or break its readers: the architecture's ImageNet
    facts, and ``num_classes`` among the ``model_args`` (transformers' TimmWrapper passes it as well, and
    timm would receive it twice)."""
    config = json.loads(path.read_text())
    config.get('model_args', {}).pop('num_classes', None)
    for key in IMAGENET_FACTS:
        config['pretrained_cfg'].pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def model_card(state: Dict[str, Any], config: Dict[str, Any], metrics: Dict[str, Any], source: str) -> str:
    """The folder's README.md: what the model is, how to load it, and the run's data, recipe and metrics."""
    name, classes = state['model'], list(state['class_names'])
    hat_net = name.startswith('hat_net')
    recipe = {k: config[k] for k in CARD_SETTINGS if config.get(k) not in (None, '', 0)}
    scores = {k: round(v, 4) for k, v in metrics.items() if k.startswith('val_') and isinstance(v, float)}
    setup = 'import hatnet  # registers the hat_net architectures with timm\n' if hat_net else ''
    header = {'library_name': 'timm', 'pipeline_tag': 'image-classification',
              'tags': ['image-classification', 'timm', 'transformers', 'hatnet']}
    lines = [
        '---', yaml.safe_dump(header, sort_keys=False).strip(), '---',
        f'# {name} fine-tuned on {config.get("data", "its data")}', '',
        f'An image classifier of {len(classes)} classes trained with hatnet (from `{source}`).'
        + (' HAT-Net: "Vision Transformers with Hierarchical Attention", Liu et al., Machine Intelligence '
           'Research 2024, arXiv 2106.03180.' if hat_net else ''), '',
        '## Use', '', '```python', setup + 'import timm', "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', "
                                                       "pretrained=True).eval()", '',
        setup + 'from transformers import pipeline',
        "classify = pipeline('image-classification', model='PATH/TO/THIS/FOLDER')", '```', '',
        ('`import hatnet` must come first: timm and transformers build the network from timm\'s registry of '
         'architectures, where hatnet registers `hat_net_*`.' if hat_net else ''), '',
        '## Classes', '', ', '.join(f'`{c}`' for c in classes), '',
        '## Training', '', *(f'- {key}: `{value}`' for key, value in recipe.items()), '',
        '## Validation metrics (fractions)', '', *(f'- {key}: {value}' for key, value in scores.items()), '',
    ]
    return '\n'.join(lines)
