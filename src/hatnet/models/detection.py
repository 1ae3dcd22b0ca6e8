""" HAT-Net detectors: torchvision RetinaNet and Mask R-CNN on a timm features_only backbone

The paper evaluates HAT-Net on COCO with RetinaNet (object detection) and Mask R-CNN (instance
segmentation) in PVT's 1x setting. These builders assemble exactly those detectors from torchvision's parts:

* RetinaNet: backbone stages 2-4 (strides 8/16/32) -> FPN (256 channels) with P6/P7 computed from the
  last backbone stage ("on input", as in PVT / mmdetection) -> RetinaNet head, anchors and focal loss.
* Mask R-CNN: all four stages (strides 4-32) -> FPN (256 channels) with a max-pooled P6 -> RPN, RoIAlign,
  two-layer box head and four-conv mask head.

``head_norm='gn'`` puts GroupNorm(32) into the FPN and the heads instead (torchvision's "v2" head layout:
RetinaNet head convs with norm, Mask R-CNN's four-conv-one-fc box head and normalised mask head; the
detectors of "Rethinking ImageNet Pre-training", which train from scratch). The paper's detectors have none.

The backbone is any timm model created with ``features_only=True`` (every hat_net variant, or e.g. resnet50
for comparisons), by the one model factory (:mod:`hatnet.models.factory`): pretrained weights load strictly,
``frozen_stages`` freezes the stem and the first stages. Normalisation layers outside the frozen stages are
left as they are: HAT-Net uses GroupNorm, which does not depend on the batch, so nothing is converted the way
torchvision freezes all of ResNet's BatchNorm (BatchNorm inside frozen stages is frozen with them).

Labels follow torchvision: 0 is the background, classes are 1..num_classes-1.

Under autocast (bf16 or fp16) the prediction heads hand float32 outputs to the box decoding, the losses and the
post-processing: torchvision decodes boxes in the dtype of the regression output, casting the anchors to it, and
bf16's 8 significant bits would put a box edge near x = 800 on a 4-pixel grid.

Images are normalised with the backbone's mean/std and batched (padded to multiples of 32) by torchvision's
``GeneralizedRCNNTransform``. Training images arrive already resized and flipped by the data pipeline
(``hatnet.data.detection``, transforms v2, which moves boxes and masks along), so the model resizes only at
inference, where torchvision also maps the results back to the size of the input image.
"""
import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, Optional, Sequence

import timm
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7)
from torchvision.ops.poolers import initLevelMapper

from ..errors import HatNetError
from .factory import Weights, create

__all__ = ['ARCHS', 'HEAD_NORMS', 'StridedRoIAlign', 'TimmBackboneWithFPN', 'anchor_generator', 'check_arch',
           'check_head_norm', 'create_detector', 'maskrcnn_hat_net', 'retinanet_hat_net']

FPN_CHANNELS = 256
ANCHOR_SIZE = 32  # torchvision's (and mmdetection's) smallest anchor: 32 px on the finest level, doubling per level
ASPECT_RATIOS = (0.5, 1.0, 2.0)
HEAD_NORMS = ('none', 'gn')


class TimmBackboneWithFPN(nn.Module):
    """A timm features_only model followed by torchvision's FeaturePyramidNetwork.

    Returns the ordered dict of 256-channel maps torchvision's detectors expect: '0', '1', ... for the
    backbone levels (finest first), then the extra levels ('p6', 'p7' or 'pool').
    """

    def __init__(self, body: nn.Module, extra_blocks: ExtraFPNBlock, out_channels: int = FPN_CHANNELS,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _backbone(name: str, out_indices: Sequence[int], weights: Optional[Weights], frozen_stages: int,
              drop_path_rate: float) -> nn.Module:
    """The timm features_only body, from the one model factory (strict weight loading, stage freezing)."""
    return create(name, weights, features_only=True, out_indices=out_indices, frozen_stages=frozen_stages,
                  drop_path_rate=drop_path_rate or None)  # 0: leave it unset, for models without stochastic depth


class StridedRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with each level's scale set from the backbone's strides.

    torchvision guesses the scales on the first call (feature size / largest image size, rounded to a power of
    two) and keeps them for good. Batches are padded to multiples of 32, so for images shorter than ~68 px the
    guess is twice the true scale, and the first batch decides: the trained model and the same weights loaded
    for inference would pool RoIs from different places.
    """

    def __init__(self, strides: Sequence[int], output_size: int, sampling_ratio: int = 2):
        super().__init__([str(i) for i in range(len(strides))], output_size, sampling_ratio)
        self.scales = [1.0 / stride for stride in strides]
        self.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                          canonical_scale=self.canonical_scale,
                                          canonical_level=self.canonical_level)


def check_head_norm(head_norm: str) -> None:
    if head_norm not in HEAD_NORMS:
        raise HatNetError(f'unknown head_norm {head_norm!r}: choose one of {", ".join(HEAD_NORMS)}')


def _norm_layer(head_norm: str) -> Optional[Callable[..., nn.Module]]:
    check_head_norm(head_norm)
    # GroupNorm: independent of the batch, which is a few images per step in detection
    return partial(nn.GroupNorm, 32) if head_norm == 'gn' else None


def _transform_kwargs(body: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` plus the backbone's normalisation for torchvision's GeneralizedRCNNTransform."""
    config = timm.data.resolve_model_data_config(body)
    # _skip_resize: training images come resized by the data pipeline (torchvision's own references do this
    # for their transforms-v2 multi-scale pipelines); inference still resizes to min_size / max_size.
    return {'image_mean': list(config['mean']), 'image_std': list(config['std']), '_skip_resize': True, **kwargs}


def retinanet_hat_net(
        num_classes: int,
        backbone: str = 'hat_net_tiny',
        pretrained_backbone: Optional[Weights] = None,
        frozen_stages: int = 0,
        drop_path_rate: float = 0.1,
        head_norm: str = 'none',
        **kwargs,
) -> RetinaNet:
    """RetinaNet with a timm backbone: stages 2-4 -> FPN with P6/P7 -> torchvision RetinaNet head and loss.

    Args:
        num_classes: number of classes including the background, as in torchvision.
        backbone: timm model name (any hat_net variant, or any features_only timm model).
        pretrained_backbone: ImageNet weights for the backbone: a checkpoint file (an original HAT-Net .pth, a
            hatnet .safetensors, a timm checkpoint of the named model) or a classification run, loaded strictly
            (:func:`hatnet.models.factory.create`).
        frozen_stages: freeze the backbone's stem and first N stages.
        drop_path_rate: stochastic depth of the backbone.
        head_norm: 'none' (the paper's detectors) or 'gn': GroupNorm in the FPN and the heads.
        **kwargs: passed to torchvision's ``RetinaNet``: min_size / max_size (inference resize, 800 / 1333),
            score_thresh (0.05), detections_per_img (here 100, COCO's limit), anchor_generator, nms_thresh, ...
    """
    body = _backbone(backbone, (-3, -2, -1), pretrained_backbone, frozen_stages, drop_path_rate)
    # P6/P7 from the last backbone stage (C5), PVT's and mmdetection's 'on_input' extra convs
    extra_levels = LastLevelP6P7(body.feature_info.channels()[-1], FPN_CHANNELS)
    kwargs.setdefault('detections_per_img', 100)
    norm_layer = _norm_layer(head_norm)
    if norm_layer:
        anchors = kwargs.setdefault('anchor_generator', anchor_generator('retinanet'))
        kwargs['head'] = RetinaNetHead(FPN_CHANNELS, anchors.num_anchors_per_location()[0], num_classes, norm_layer)
    return RetinaNet(TimmBackboneWithFPN(body, extra_levels, norm_layer=norm_layer), num_classes,
                     **_transform_kwargs(body, kwargs))


def maskrcnn_hat_net(
        num_classes: int,
        backbone: str = 'hat_net_tiny',
        pretrained_backbone: Optional[Weights] = None,
        frozen_stages: int = 0,
        drop_path_rate: float = 0.1,
        head_norm: str = 'none',
        **kwargs,
) -> MaskRCNN:
    """Mask R-CNN with a timm backbone: stages 1-4 -> FPN with max-pooled P6 -> torchvision RPN and RoI heads.

    Arguments as in :func:`retinanet_hat_net`; ``**kwargs`` go to torchvision's ``MaskRCNN``: min_size /
    max_size, box_score_thresh (0.05), box_detections_per_img (100), box_batch_size_per_image (512), ...
    """
    body = _backbone(backbone, (-4, -3, -2, -1), pretrained_backbone, frozen_stages, drop_path_rate)
    strides = body.feature_info.reduction()
    # torchvision's default poolers (7 x 7 boxes, 14 x 14 masks, sampling ratio 2), at the known strides
    kwargs.setdefault('box_roi_pool', StridedRoIAlign(strides, 7))
    kwargs.setdefault('mask_roi_pool', StridedRoIAlign(strides, 14))
    norm_layer = _norm_layer(head_norm)
    if norm_layer:
        kwargs['box_head'] = FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [256] * 4, [1024], norm_layer)
        kwargs['mask_head'] = MaskRCNNHeads(FPN_CHANNELS, [256] * 4, 1, norm_layer)
    return MaskRCNN(TimmBackboneWithFPN(body, LastLevelMaxPool(), norm_layer=norm_layer), num_classes,
                    **_transform_kwargs(body, kwargs))


ARCHS = {'retinanet': retinanet_hat_net, 'maskrcnn': maskrcnn_hat_net}


def anchor_generator(arch: str, anchor_size: int = ANCHOR_SIZE) -> AnchorGenerator:
    """torchvision's default anchors of a detector with the smallest side ``anchor_size`` instead of 32 (five
    levels, each twice the previous): RetinaNet has 3 scales (x1, x2^1/3, x2^2/3) x 3 ratios per location, the
    Mask R-CNN RPN 1 scale x 3 ratios. With 32 this is exactly what the detectors build by themselves."""
    bases = [anchor_size * 2 ** level for level in range(5)]
    if arch == 'retinanet':
        sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in bases)
    else:
        sizes = tuple((x,) for x in bases)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise HatNetError(f'unknown detector {arch!r}: choose one of {", ".join(ARCHS)}')


def create_detector(arch: str, num_classes: int, anchor_size: int = ANCHOR_SIZE, **kwargs) -> nn.Module:
    """``retinanet_hat_net`` or ``maskrcnn_hat_net`` by name; ``anchor_size``: the smallest anchor side
    (:func:`anchor_generator`; 32, torchvision's, leaves the detector's own anchors). The prediction heads'
    outputs are float32 under autocast (see the module docstring)."""
    check_arch(arch)
    if anchor_size != ANCHOR_SIZE:
        kwargs['anchor_generator' if arch == 'retinanet' else 'rpn_anchor_generator'] = \
            anchor_generator(arch, anchor_size)
    detector = ARCHS[arch](num_classes, **kwargs)
    heads = [detector.head] if arch == 'retinanet' else [
        detector.rpn.head, detector.roi_heads.box_predictor, detector.roi_heads.mask_predictor]
    for head in heads:
        head.register_forward_hook(_float32_outputs)
    return detector


def _float32_outputs(module: nn.Module, inputs, output):
    """Forward hook: the module's output with its floating-point tensors in float32."""
    return _float32(output)


def _float32(value):
    """``value`` with every floating-point tensor in it (also inside dicts, lists and tuples) in float32; float32
    tensors are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float32(item) for item in value)
    return value
