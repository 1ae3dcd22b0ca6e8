"""torchvision detectors (RetinaNet, Mask R-CNN on any timm backbone) to ONNX, whole: pre- and post-processing
in the graph.

The graph takes one RGB image, ``image`` (3, height, width), float32 in [0, 1], of any size, and returns its
detections in the image's pixels, as the PyTorch detector in eval mode does: normalisation with the
backbone's mean / std, the resize to the run's ``min_size`` / ``max_size``, padding to a multiple of 32,
the network, box decoding, score threshold, per-class NMS, the ``detections_per_img`` best, boxes mapped
back to the input size and, for Mask R-CNN, the masks pasted into the image. Outputs (N = detections):

* ``boxes`` (N, 4) float32 x1, y1, x2, y2;
* ``labels`` (N,) int64: 1 .. number of classes (0 is torchvision's background);
* ``scores`` (N,) float32;
* ``masks`` (N, 1, height, width) float32 probabilities (Mask R-CNN only; threshold them at 0.5).

The export traces torchvision's ONNX path (``torch.onnx.export`` with the TorchScript-based exporter,
``dynamo=False``): torchvision writes its NMS, RoIAlign and mask pasting for it. One step is replaced: the
resize. torchvision's traced resize hands ``Resize`` a float32 scale, whose product with a side can fall
just under a whole number that PyTorch's float64 arithmetic reaches (a side of 70 scaled to 64 becomes
63 in onnxruntime), so the image, and every detection after it, differs; ``_ResizeLikeEager`` computes the
size in float64 in the graph, exactly as PyTorch does.
"""
import io
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..fileio import atomic_write
from .hat_net_onnx import onnx_forms

__all__ = ['DetectorForOnnx', 'detection_outputs', 'export_detector_onnx', 'match_detections']

MASK_OUTPUT = 'masks'


def detection_outputs(detector: nn.Module) -> Tuple[str, ...]:
    """The graph's output names, in order: boxes, labels, scores (and masks for Mask R-CNN)."""
    with_masks = getattr(getattr(detector, 'roi_heads', None), 'has_mask', lambda: False)()
    return ('boxes', 'labels', 'scores') + ((MASK_OUTPUT,) if with_masks else ())


class _ResizeLikeEager(torch.autograd.Function):
    """The eval resize of torchvision's GeneralizedRCNNTransform, (C, H, W) -> (C, h, w), written to ONNX with
    PyTorch's own arithmetic: scale = min(min_size / shorter side, max_size / longer side) and each side
    floor(side * scale), in float64; then bilinear interpolation to that size (half-pixel centres)."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, min_size: float, max_size: float) -> torch.Tensor:
        height, width = image.shape[-2:]
        scale = min(min_size / min(height, width), max_size / max(height, width))
        return F.interpolate(image[None], scale_factor=scale, mode='bilinear', recompute_scale_factor=True,
                             align_corners=False)[0]

    @staticmethod
    def symbolic(g, image, min_size: float, max_size: float):
        def constant(values, dtype=torch.float64):
            return g.op('Constant', value_t=torch.tensor(values, dtype=dtype))

        # one-element tensors, not scalars: the exporter's type promotion would turn float64 scalars into
        # float32, the very rounding this resize avoids
        sides = g.op('Cast', g.op('Shape', image, start_i=1), to_i=11)  # float64 (H, W)
        scale = g.op('Min', g.op('Div', constant([min_size]), g.op('ReduceMin', sides, keepdims_i=1)),
                     g.op('Div', constant([max_size]), g.op('ReduceMax', sides, keepdims_i=1)))
        size = g.op('Cast', g.op('Floor', g.op('Mul', sides, scale)), to_i=7)  # int64
        batched = g.op('Unsqueeze', image, constant([0], torch.int64))
        sizes = g.op('Concat', g.op('Shape', batched, start_i=0, end_i=2), size, axis_i=0)
        empty = constant([], torch.float32)  # no region of interest, no scales: the sizes decide
        resized = g.op('Resize', batched, empty, empty, sizes, mode_s='linear',
                       coordinate_transformation_mode_s='pytorch_half_pixel')
        return g.op('Squeeze', resized, constant([0], torch.int64))


class _TransformForOnnx(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose eval resize is ``_ResizeLikeEager`` (the rest is torchvision's)."""

    def resize(self, image, target=None):
        if self.training or self.fixed_size is not None or target is not None:
            return super().resize(image, target)
        return _ResizeLikeEager.apply(image, float(self.min_size[-1]), float(self.max_size)), target


class DetectorForOnnx(nn.Module):
    """A copy of a torchvision detector in eval mode as the graph's function: image (3, H, W) -> the outputs of
    :func:`detection_outputs`, a tuple of tensors instead of a list of dictionaries. hat_net modules take
    their ONNX forms (``onnx_forms``); the given detector is left as it is."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.output_names = detection_outputs(detector)
        self.detector = onnx_forms(detector).eval().float().cpu()
        self.detector.transform.__class__ = _TransformForOnnx

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in self.output_names)


def export_detector_onnx(detector: nn.Module, path, opset: int = 18, example_size: Sequence[int] = (224, 288),
                         metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a torchvision detector (RetinaNet, Mask R-CNN) to ``path`` as described in the module docstring,
    with dynamic image height and width and a dynamic number of detections. Written atomically (the
    detector itself is not changed). ``metadata``: written to the file's metadata_props."""
    import onnx

    from .onnx import _move_weights_into_loops, check_opset, set_metadata
    check_opset(opset)
    path = Path(path)
    model = DetectorForOnnx(detector)
    example = torch.rand(3, *example_size, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {'image': {1: 'height', 2: 'width'},
                    **{name: {0: 'detections'} for name in model.output_names}}
    if MASK_OUTPUT in model.output_names:
        dynamic_axes[MASK_OUTPUT].update({2: 'height', 3: 'width'})

    def write(tmp: str) -> None:
        exported = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about every Python number torchvision derives from a shape; its ONNX path
            # keeps them dynamic
            warnings.simplefilter('ignore')
            torch.onnx.export(model, (example,), exported, dynamo=False, opset_version=opset,
                              input_names=['image'], output_names=list(model.output_names),
                              dynamic_axes=dynamic_axes)
        graph_model = onnx.load_from_string(exported.getvalue())
        _move_weights_into_loops(graph_model.graph)  # the backbone's MLP loops, as for classifiers
        set_metadata(graph_model, metadata or {})
        onnx.save(graph_model, tmp)

    atomic_write(path, write)
    return path


def match_detections(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """How far two detection results of one image are apart: each expected detection is paired with the
    nearest unpaired actual one of the same label (boxes and score), the largest differences of the pairs
    are returned (``boxes``, ``scores``, ``masks`` if present), and ``unmatched``: the detections without a
    partner (different counts, or labels). Order does not matter: detections of almost equal scores may
    come out in either order."""
    count = max(len(expected['boxes']), len(actual['boxes']))
    taken: List[int] = []
    diffs = {'boxes': 0.0, 'scores': 0.0, **({MASK_OUTPUT: 0.0} if MASK_OUTPUT in expected else {})}
    for i in range(len(expected['boxes'])):
        distance = (actual['boxes'] - expected['boxes'][i]).abs().amax(1) + \
            (actual['scores'] - expected['scores'][i]).abs()
        distance[actual['labels'] != expected['labels'][i]] = float('inf')
        if taken:
            distance[taken] = float('inf')
        if not len(distance) or not torch.isfinite(distance.min()):
            continue
        j = int(distance.argmin())
        taken.append(j)
        for key in diffs:
            diffs[key] = max(diffs[key], (actual[key][j].float() - expected[key][i].float()).abs().max().item())
    return dict(diffs, unmatched=float(count - len(taken)))
