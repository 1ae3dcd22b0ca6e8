""" Semantic FPN on a timm backbone

Paper: `Panoptic Feature Pyramid Networks` - https://arxiv.org/abs/1901.02446
    Alexander Kirillov, Ross Girshick, Kaiming He, Piotr Dollar. CVPR 2019.

The semantic segmentation branch of Panoptic FPN, as used for ADE20K by PVT and HAT-Net:

* an FPN (256 channels) over the backbone's stride 4/8/16/32 maps (torchvision's FeaturePyramidNetwork);
* one scale head per level: [3x3 conv (128 ch) + norm + ReLU + 2x bilinear upsampling] repeated until the
  level reaches stride 4 (a single conv without upsampling for the stride-4 level);
* the four stride-4 maps are summed, then dropout and a 1x1 classifier; the logits are upsampled
  bilinearly to the input size.

The backbone is any timm model that supports ``features_only`` and has features at strides 4, 8, 16 and 32
(every hat_net variant, pvt_v2_*, resnet*, convnext_*, ...), so HAT-Net can be compared with other
backbones under one head.
"""
import math
from collections import OrderedDict
from functools import partial
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from ..errors import HatNetError
from .factory import Weights, create

__all__ = ['PyramidSegmenter', 'SemanticFPN']

FPN_STRIDES = (4, 8, 16, 32)


def head_norm(norm: str):
    """GroupNorm with 32 groups (independent of the batch size) or BatchNorm."""
    return partial(nn.GroupNorm, 32) if norm == 'gn' else nn.BatchNorm2d


class PyramidSegmenter(nn.Module):
    """What every segmentation head here shares: a timm ``features_only`` backbone and the indices of its last
    feature at each of the strides 4, 8, 16 and 32 (e.g. resnet's stride-2 stem feature is skipped)."""

    def __init__(self, backbone: str, num_classes: int, pretrained: Optional[Weights], norm: str,
                 drop_path_rate: Optional[float], frozen_stages: int):
        super().__init__()
        if norm not in ('gn', 'bn'):
            raise HatNetError(f"norm must be 'gn' or 'bn', got {norm!r}")
        if num_classes < 1:
            raise HatNetError(f'num_classes must be at least 1, got {num_classes}')
        self.num_classes = num_classes
        self.backbone = create(backbone, pretrained, features_only=True, drop_path_rate=drop_path_rate,
                               frozen_stages=frozen_stages)
        reductions = self.backbone.feature_info.reduction()
        missing = [s for s in FPN_STRIDES if s not in reductions]
        if missing:
            raise HatNetError(f'backbone {backbone} has no features at stride {missing} (its feature strides are '
                              f'{reductions}); a segmentation head needs strides {FPN_STRIDES}')
        self.feature_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in FPN_STRIDES]
        self.level_channels = [self.backbone.feature_info.channels()[i] for i in self.feature_indices]

    @property
    def pretrained_cfg(self) -> dict:
        """The backbone's timm pretrained cfg (input normalisation mean / std)."""
        return self.backbone.pretrained_cfg

    def levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The backbone's stride 4, 8, 16 and 32 maps."""
        features = self.backbone(x)
        return [features[i] for i in self.feature_indices]


class ScaleHead(nn.Sequential):
    """3x3 conv + norm + ReLU (+ 2x bilinear upsampling) per halving of the stride, down to the output stride."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, out_stride: int, norm_layer):
        layers = []
        for i in range(max(1, int(math.log2(stride // out_stride)))):
            layers.append(Conv2dNormActivation(in_chs if i == 0 else out_chs, out_chs, 3, norm_layer=norm_layer))
            if stride > out_stride:
                layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
        super().__init__(*layers)


class SemanticFPN(PyramidSegmenter):
    """Semantic FPN segmentation model: timm backbone -> FPN -> scale heads -> per-pixel logits.

    Args:
        backbone: timm model name; any model whose ``features_only`` version has stride 4/8/16/32 features.
        num_classes: number of output classes.
        pretrained: ImageNet weights for the backbone: a checkpoint file (an original HAT-Net .pth, a hatnet
            .safetensors, a timm checkpoint of the named model) or a classification run; loaded strictly
            (see :func:`hatnet.models.factory.create`).
        fpn_channels: FPN width (256 in the paper).
        head_channels: width of the scale heads (128 in the paper).
        norm: 'gn' (GroupNorm, 32 groups; independent of the batch size) or 'bn' (BatchNorm) in the scale heads.
        dropout: channel dropout before the classifier.
        drop_path_rate: stochastic depth of the backbone (None: the model's default).
        frozen_stages: freeze the backbone's stem and first N stages.
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            pretrained: Optional[Weights] = None,
            fpn_channels: int = 256,
            head_channels: int = 128,
            norm: str = 'gn',
            dropout: float = 0.1,
            drop_path_rate: Optional[float] = None,
            frozen_stages: int = 0,
    ):
        super().__init__(backbone, num_classes, pretrained, norm, drop_path_rate, frozen_stages)
        self.fpn = FeaturePyramidNetwork(self.level_channels, fpn_channels)
        norm_layer = head_norm(norm)
        self.scale_heads = nn.ModuleList([
            ScaleHead(fpn_channels, head_channels, stride, FPN_STRIDES[0], norm_layer) for stride in FPN_STRIDES])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        # small initial logits (as mmsegmentation): the first loss is ~log(num_classes), not a large random one
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = self.fpn(OrderedDict((str(s), level) for s, level in zip(FPN_STRIDES, self.levels(x))))
        levels = [head(level) for head, level in zip(self.scale_heads, pyramid.values())]
        out = levels[0]
        for y in levels[1:]:
            # odd input sizes make the upsampled levels differ by a pixel from the stride-4 map
            out = out + F.interpolate(y, size=out.shape[-2:], mode='bilinear', align_corners=False)
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
