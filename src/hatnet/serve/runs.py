"""The runs a server holds: loading them, what the page needs to know of each, and their results as JSON.

A :class:`Run` wraps the predictor ``hatnet.load`` returns. Its ``predict`` gives the result's ``to_dict()``
(what the CLI's ``--json`` prints) plus what a browser needs to draw it: the segmentation mask as a PNG data
URL with a legend, each detection's colour and mask. Its ``attention`` gives what ``hatnet attention`` plots,
as numbers: where one query token of an H-MHSA block looks in the local (grid cell) and the global (pooled)
step, averaged over the heads.
"""
import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from ..errors import HatNetError, InputError
from ..tasks.attention import attention_blocks, attention_probabilities
from ..tasks.predictor import Predictor

__all__ = ['Run', 'load_runs', 'png_data_url']


def png_data_url(picture: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL, which a page can draw without another request."""
    buffer = io.BytesIO()
    picture.save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


class _FeatureStages(nn.Module):
    """The backbone of a segmentation or detection model (timm's ``features_only`` network, whose stages are
    the children ``stages_0``, ``stages_1``, ...) with the classifier's ``stages`` list, which is what
    :func:`attention_probabilities` looks for."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.stages = [module for name, module in body.named_children() if name.startswith('stages_')]
        self.feature_info = getattr(body, 'feature_info', None)

    def forward(self, x):
        return self.body(x)


@dataclass
class Run:
    """One loaded run: its name on the page, the file or folder it came from, and its predictor."""
    name: str
    path: str
    predictor: Predictor

    def __post_init__(self):
        self.network = self._attention_network()  # None unless the model is a HAT-Net
        self.blocks = [f'{stage}.{block}' for stage, block in attention_blocks(self.network)] if self.network else []

    @property
    def task(self) -> str:
        return self.predictor.task

    @property
    def model(self) -> str:
        """The timm name of the network (the backbone for segmentation and detection)."""
        predictor = self.predictor
        return predictor.config.model if self.task == 'detection' else predictor.model_name

    def info(self) -> Dict[str, Any]:
        """What ``GET /api/runs`` lists: name, task, model, classes, the H-MHSA blocks (``STAGE.BLOCK``; empty
        for other models) and per task the segmentation palette or the detector's architecture and score
        threshold."""
        info = dict(name=self.name, path=self.path, task=self.task, model=self.model,
                    classes=self.predictor.class_names, attention_blocks=self.blocks)
        if self.task == 'segmentation':
            info['palette'] = [list(colour) for colour in self.predictor.palette]
        if self.task == 'detection':
            info.update(arch=self.predictor.config.arch, score_thresh=self.predictor.config.score_thresh)
        return info

    # ------------------------------------------------------------------------------------------ predictions
    def predict(self, picture: Image.Image, image_name: Optional[str] = None) -> Dict[str, Any]:
        """The result's ``to_dict()`` with ``image`` set to the upload's name, plus ``run``, ``task``,
        ``latency_ms`` (the model's time) and what the page draws (see the module's docstring)."""
        start = time.perf_counter()
        result = self.predictor.predict(picture)[0]
        latency_ms = (time.perf_counter() - start) * 1000
        response = dict(result.to_dict(), image=image_name, run=self.name, task=self.task,
                        latency_ms=round(latency_ms, 1))
        if self.task == 'segmentation':
            response.update(mask=png_data_url(result.colorized()), legend=self._legend(result))
        if self.task == 'detection':
            self._add_drawing(response['detections'], result)
        return response

    def _legend(self, segmentation) -> List[Dict[str, Any]]:
        """The classes in the mask, largest first: index, name, colour and the fraction of pixels."""
        names = segmentation.class_names
        shares = segmentation.shares(top=len(names))
        return [dict(index=names.index(name), name=name, colour=list(segmentation.palette[names.index(name)]),
                     share=share) for name, share in shares.items()]

    @staticmethod
    def _add_drawing(entries: List[Dict[str, Any]], detection) -> None:
        """Give each detection entry its colour (that of ``Detection.draw``) and, for Mask R-CNN, its mask as
        a PNG in that colour cropped to the mask (``mask``: ``x``, ``y`` of its top-left pixel and ``png``)."""
        from ..tasks.detection import _category_colour
        masks = detection.masks if detection.masks is not None else [None] * len(entries)
        for entry, category_id, mask in zip(entries, detection.category_ids, masks):
            colour = _category_colour(category_id)
            entry['colour'] = list(colour)
            if mask is not None and mask.any():
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                rgba = np.zeros((*crop.shape, 4), np.uint8)
                rgba[crop] = (*colour, 255)
                entry['mask'] = dict(x=int(cols[0]), y=int(rows[0]), png=png_data_url(Image.fromarray(rgba, 'RGBA')))

    # ------------------------------------------------------------------------------------------- attention
    def _attention_network(self) -> Optional[nn.Module]:
        """The HAT-Net network in the layout :func:`attention_probabilities` reads, or None for other models."""
        model = self.predictor.model
        if self.task == 'segmentation':
            model = _FeatureStages(model.backbone)
        elif self.task == 'detection':
            model = _FeatureStages(model.backbone.body)
        try:
            attention_blocks(model)
        except HatNetError:
            return None
        return model

    def _model_input(self, picture: Image.Image) -> Tuple[torch.Tensor, Sequence[float], Sequence[float]]:
        """The image as the network sees it (C, H, W), and the mean and std it was normalised with."""
        predictor = self.predictor
        if self.task == 'classification':  # resized and centre-cropped, as `hatnet attention` shows it
            return predictor.transform(picture), predictor.data_config['mean'], predictor.data_config['std']
        if self.task == 'segmentation':
            from ..tasks.segmentation import normalization
            return predictor.transform(tv_tensors.Image(pil_to_tensor(picture))), *normalization(predictor.model_name)
        # detection: torchvision's resize and normalisation, padded to the size the backbone gets
        transform = predictor.model.transform
        batch, _ = transform([pil_to_tensor(picture).float() / 255])
        return batch.tensors[0], transform.image_mean, transform.image_std

    def attention(self, picture: Image.Image, block: str, query: Optional[Tuple[float, float]] = None) -> Dict:
        """Where the query pixel (x, y of the model input; default: its centre) looks in H-MHSA block ``block``
        ('STAGE.BLOCK'): the model input as a PNG data URL (``input``, ``input_size`` [width, height]), the
        stage's token grid (``map_size`` [rows, cols], ``stride`` pixels per token), the query's token
        (``query`` [row, col]), the head-averaged probabilities of the local step (``local`` rows of its grid
        cell, ``cell`` [top row, left col]) and of the global step (``global`` over the pooled tokens, each
        ``pool`` x ``pool`` tokens; over all tokens, ``pool`` 1, for a stage without a grid), ``latency_ms``."""
        if not self.blocks:
            raise InputError(f'{self.name} is a {self.model}, not a HAT-Net: it has no H-MHSA attention to show')
        if block not in self.blocks:
            raise InputError(f'{self.name} has no block {block!r}: its blocks are {", ".join(self.blocks)}')
        stage, index = (int(v) for v in block.split('.'))
        start = time.perf_counter()
        tensor, mean, std = self._model_input(picture)
        height, width = tensor.shape[-2:]
        x, y = query if query is not None else ((width - 1) / 2, (height - 1) / 2)
        if not (0 <= x < width and 0 <= y < height):
            raise InputError(f'the query ({x:g}, {y:g}) is outside the {width}x{height} model input')
        result = attention_probabilities(self.network, tensor, stage, index, (x, y))
        latency_ms = (time.perf_counter() - start) * 1000
        shown = tensor.cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        pixels = (shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        response = dict(run=self.name, block=block, input=png_data_url(Image.fromarray(pixels)),
                        input_size=[width, height], map_size=list(result['map_size']),
                        stride=self.network.feature_info[stage]['reduction'], query=list(result['query']),
                        pool=result.get('pool', 1), heads=result['global'].shape[0], latency_ms=round(latency_ms, 1))
        response['global'] = result['global'].mean(0).tolist()
        if 'local' in result:
            response.update(local=result['local'].mean(0).tolist(), cell=list(result['cell']))
        return response


def load_runs(paths: Sequence, device: str = 'auto', amp: str = 'none') -> Dict[str, Run]:
    """Each checkpoint (a run directory, a checkpoint file or an original HAT-Net .pth) loaded with
    :func:`hatnet.load` (``amp``: its predictions under autocast), by name: the folder's name or the file's
    stem, with -2, -3, ... for repeats."""
    from .. import load

    runs: Dict[str, Run] = {}
    for path in paths:
        path = Path(path)
        base = (path.resolve().name if path.is_dir() else path.stem) or 'run'
        name, n = base, 1
        while name in runs:
            n += 1
            name = f'{base}-{n}'
        runs[name] = Run(name, str(path), load(path, device=device, amp=amp))
    return runs
