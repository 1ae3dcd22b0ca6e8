"""What a trained run exports as, per task, and how its export is checked against PyTorch.

* classification (a run, a checkpoint, or a timm model name): ``images`` (B, 3, H, W) normalised with the
  run's mean / std -> ``output`` (B, classes) logits;
* segmentation: ``images`` (B, 3, H, W) normalised -> ``output`` (B, classes, H, W) logits at the input size,
  or with ``seg_output='labels'`` (B, H, W) int64 class indices (their argmax);
* detection: ``image`` (3, H, W) RGB in [0, 1], one image -> boxes, labels, scores (and masks), normalised,
  resized and post-processed in the graph (:mod:`hatnet.export.detection_onnx`).

The file's metadata_props say which, with the class names and the preprocessing (``hatnet.*`` keys).
"""
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import timm
import torch
from torch import nn

from ..errors import HatNetError
from .detection_onnx import detection_outputs, export_detector_onnx, match_detections
from .onnx import OnnxRunner, export_onnx

__all__ = ['ExportTarget', 'SEG_OUTPUTS', 'SegmentationLabels', 'check_export', 'target_for_model',
           'target_for_predictor', 'write_onnx']

SEG_OUTPUTS = ('logits', 'labels')


class SegmentationLabels(nn.Module):
    """A segmentation model that returns each pixel's class index (the argmax of its logits), (B, H, W) int64."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.in_chans = getattr(model, 'in_chans', 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).argmax(1)


@dataclass
class ExportTarget:
    """The network to export, its task and the metadata written with it."""
    net: nn.Module
    task: str
    metadata: Dict[str, str] = field(default_factory=dict)


def _metadata(task: str, class_names: Sequence[str], **values) -> Dict[str, str]:
    entries = dict(task=task, class_names=list(class_names), **values)
    return {f'hatnet.{key}': value if isinstance(value, str) else json.dumps(value) for key, value in entries.items()}


def target_for_model(net: nn.Module) -> ExportTarget:
    """A timm classifier (or backbone) built from a model name: its pretrained cfg's preprocessing."""
    config = timm.data.resolve_model_data_config(net)
    names = [str(i) for i in range(getattr(net, 'num_classes', 0))]
    return ExportTarget(net, 'classification', _metadata(
        'classification', names, input='images: (batch, 3, height, width) float32, RGB in [0, 1], normalised',
        mean=list(config['mean']), std=list(config['std']), input_size=list(config['input_size'][1:])))


def target_for_predictor(predictor, seg_output: str = 'logits') -> ExportTarget:
    """The export of a loaded run (``hatnet.load``) of any task."""
    if seg_output not in SEG_OUTPUTS:
        raise HatNetError(f'unknown segmentation output {seg_output!r}: choose one of {", ".join(SEG_OUTPUTS)}')
    model, names = predictor.model, predictor.class_names
    if predictor.task == 'detection':
        config = predictor.config
        return ExportTarget(model, 'detection', _metadata(
            'detection', names, arch=config.arch, category_ids=predictor.category_ids,
            input='image: (3, height, width) float32, RGB in [0, 1]; normalised and resized in the graph',
            outputs=list(detection_outputs(model)), min_size=config.min_size, max_size=config.max_size))
    if predictor.task == 'segmentation':
        from ..tasks.segmentation import normalization
        mean, std = normalization(predictor.model_name)
        net = SegmentationLabels(model) if seg_output == 'labels' else model
        return ExportTarget(net, 'segmentation', _metadata(
            'segmentation', names, output=seg_output, mean=list(mean), std=list(std),
            short_side=predictor.short_side,
            input='images: (batch, 3, height, width) float32, RGB in [0, 1], normalised, any size >= 32'))
    data = predictor.data_config
    return ExportTarget(model, 'classification', _metadata(
        'classification', names, mean=list(data['mean']), std=list(data['std']),
        input_size=list(data['input_size'][1:]), crop_pct=data.get('crop_pct'),
        interpolation=data.get('interpolation'),
        input='images: (batch, 3, height, width) float32, RGB in [0, 1], normalised'))


def write_onnx(target: ExportTarget, path, opset: int):
    """Export ``target`` to ``path``; returns the path."""
    if target.task == 'detection':
        return export_detector_onnx(target.net, path, opset=opset, metadata=target.metadata)
    return export_onnx(target.net, path, opset=opset, metadata=target.metadata)


def check_export(target: ExportTarget, path, sizes: Sequence[Tuple[int, int]],
                 report: Callable[[str], None]) -> List[Dict[str, float]]:
    """Run the file in onnxruntime and the network in PyTorch on random inputs of each size; ``report`` gets one
    line per size. Returns the differences per size."""
    generator = torch.Generator().manual_seed(0)
    results = []
    if target.task == 'detection':
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # torchvision's RoI pooling graph makes onnxruntime warn on every run
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        names = [output.name for output in session.get_outputs()]
        for size in sizes:
            image = torch.rand(3, *size, generator=generator)
            with torch.inference_mode():
                expected = target.net([image])[0]
            actual = dict(zip(names, map(torch.from_numpy, session.run(None, {'image': image.numpy()}))))
            diff = match_detections(expected, actual)
            results.append(diff)
            report(f'onnxruntime vs PyTorch at {size[0]}x{size[1]}: {len(actual["boxes"])} detections '
                   f'({len(expected["boxes"])} in PyTorch, {int(diff["unmatched"])} unpaired), max |Δ| boxes '
                   f'{diff["boxes"]:.2e} px, scores {diff["scores"]:.2e}'
                   + (f', masks {diff["masks"]:.2e}' if 'masks' in diff else ''))
        return results
    runner = OnnxRunner(path)
    for size in sizes:
        images = torch.randn(2, getattr(target.net, 'in_chans', 3), *size, generator=generator)
        with torch.inference_mode():
            expected, actual = target.net(images), runner(images)
        if expected.dtype == torch.int64:  # label maps
            differing = (expected != actual).float().mean().item()
            results.append(dict(labels=differing))
            report(f'onnxruntime vs PyTorch at 2x{size[0]}x{size[1]}: labels differ at {differing:.2%} of pixels')
        else:
            diff = (actual - expected).abs().max().item()
            results.append(dict(output=diff))
            report(f'onnxruntime vs PyTorch at 2x{size[0]}x{size[1]}: max |Δ| {diff:.2e}')
    return results
