"""Convert original HAT-Net checkpoints to hatnet's layout as safetensors."""
from pathlib import Path
from typing import Optional

import timm

from .fileio import read_state_dict, save_safetensors_atomic
from .errors import CheckpointError
from .models import MODEL_NAMES, checkpoint_filter_fn, guess_variant
from .models.weights import remap_original_keys


def convert_checkpoint(src, dst, model_name: Optional[str] = None, overwrite: bool = False) -> str:
    """Write ``src`` (original .pth, or any hatnet checkpoint) to ``dst`` as safetensors in hatnet's layout.

    The variant is recognised from the weights unless ``model_name`` is given. Returns the variant name.
    The result loads with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=dst))``.
    """
    dst = Path(dst)
    if dst.suffix != '.safetensors':
        raise CheckpointError(f'output must be a .safetensors file, got {dst}')
    if dst.exists() and not overwrite:
        raise CheckpointError(f'{dst} already exists (pass --overwrite to replace it)')
    state_dict = remap_original_keys(read_state_dict(src))
    model_name = model_name or guess_variant(state_dict)
    if model_name is None:
        raise CheckpointError(f'{src} is not a checkpoint of any of {", ".join(MODEL_NAMES)}')
    num_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0
    model = timm.create_model(model_name, num_classes=num_classes, device='meta')
    state_dict = checkpoint_filter_fn(state_dict, model)
    save_safetensors_atomic(state_dict, dst, metadata={'architecture': model_name, 'num_classes': str(num_classes)})
    return model_name
