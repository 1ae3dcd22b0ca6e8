""" U-Net decoder on a timm backbone

Paper: `U-Net: Convolutional Networks for Biomedical Image Segmentation` - https://arxiv.org/abs/1505.04597
    Olaf Ronneberger, Philipp Fischer, Thomas Brox. MICCAI 2015.

The decoder of U-Net over the stride 4/8/16/32 maps of a timm backbone, the shape segmentation_models_pytorch
gives it for timm encoders: from the stride-32 map down to stride 4, each step upsamples the decoded map to the
next finer level, concatenates that level's backbone map and runs two 3x3 conv + norm + ReLU; a 1x1 classifier
on the stride-4 map, logits upsampled bilinearly to the input size.

Semantic FPN (``semantic_fpn.py``, the paper's head) adds its levels after one conv each, which suits the
semantic features of an ImageNet-trained backbone. A backbone trained from scratch on a few hundred images has
no such features yet: there, fusing each finer level with the coarser context through convolutions learns far
faster (docs/segmentation.md has the measurements), so the ``auto`` recipe uses this decoder for backbones
trained from scratch.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import Conv2dNormActivation

from .factory import Weights
from .semantic_fpn import PyramidSegmenter, head_norm

__all__ = ['UNetDecoder']


class DecoderBlock(nn.Sequential):
    """Two 3x3 conv + norm + ReLU over the concatenation of a backbone level and the upsampled coarser map."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer):
        super().__init__(Conv2dNormActivation(in_chs, out_chs, 3, norm_layer=norm_layer),
                         Conv2dNormActivation(out_chs, out_chs, 3, norm_layer=norm_layer))


class UNetDecoder(PyramidSegmenter):
    """U-Net segmentation model: timm backbone -> decoder blocks from stride 32 to 4 -> per-pixel logits.

    Args:
        backbone: timm model name; any model whose ``features_only`` version has stride 4/8/16/32 features.
        num_classes: number of output classes.
        pretrained: ImageNet weights for the backbone (see :class:`hatnet.models.semantic_fpn.SemanticFPN`).
        decoder_channels: widths of the decoder blocks at strides 4, 8 and 16.
        norm: 'gn' (GroupNorm, 32 groups; independent of the batch size) or 'bn' (BatchNorm) in the decoder blocks.
        drop_path_rate: stochastic depth of the backbone (None: the model's default).
        frozen_stages: freeze the backbone's stem and first N stages.
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            pretrained: Optional[Weights] = None,
            decoder_channels: Sequence[int] = (64, 128, 256),
            norm: str = 'gn',
            drop_path_rate: Optional[float] = None,
            frozen_stages: int = 0,
    ):
        super().__init__(backbone, num_classes, pretrained, norm, drop_path_rate, frozen_stages)
        coarser = list(decoder_channels[1:]) + [self.level_channels[-1]]  # what each block receives from above
        self.blocks = nn.ModuleList([
            DecoderBlock(skip + above, out, head_norm(norm))
            for skip, above, out in zip(self.level_channels, coarser, decoder_channels)])
        # PyTorch's default init, not SemanticFPN's std 0.01: with that small classifier, from scratch on the
        # shapes set, training lowered the loss while the model in eval mode still predicted background
        # everywhere after 600 steps (docs/segmentation.md)
        self.classifier = nn.Conv2d(decoder_channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels(x)
        out = levels[-1]
        for level, block in zip(reversed(levels[:-1]), reversed(self.blocks)):
            # to the finer level's exact size: odd input sizes make the strided maps round differently
            out = F.interpolate(out, size=level.shape[-2:], mode='bilinear', align_corners=False)
            out = block(torch.cat([level, out], dim=1))
        logits = self.classifier(out)
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
