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
import re
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Optional, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from ..fileio import read_state_dict
from ..errors import CheckpointError, HatNetError
from .hat_net import VARIANT_ARGS as HAT_NET_VARIANTS

__all__ = ['SemanticFPN', 'create_backbone']

FPN_STRIDES = (4, 8, 16, 32)


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # e.g. VGG has no stochastic depth
        if 'drop_path_rate' not in str(e):
            raise
        raise HatNetError(f'backbone {name} has no drop_path_rate setting; set drop_path_rate to null') from None


def create_backbone(
        name: str,
        pretrained: Optional[Union[str, Path]] = None,
        drop_path_rate: Optional[float] = None,
) -> nn.Module:
    """A timm ``features_only`` model, initialised from an ImageNet checkpoint file if one is given.

    ``pretrained`` is an original HAT-Net .pth, one of our .safetensors / checkpoints, or a timm checkpoint
    of the named model. The file is read here (weights_only, one clear error per bad file) and handed to
    timm, which applies the model's own checkpoint filter (e.g. HAT-Net's original-key remapping).
    """
    if not timm.is_model(name):
        raise HatNetError(f'unknown backbone {name!r}: not a timm model name')
    kwargs = dict(features_only=True)
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if not pretrained:
        return _create(name, **kwargs)
    state_dict = read_state_dict(pretrained)
    overlay = dict(file=str(pretrained), state_dict=state_dict)
    if timm.models.get_pretrained_cfg_value(name, 'architecture') not in HAT_NET_VARIANTS:
        # timm loads features_only weights non-strictly (a wrong file would load silently): drop the
        # classifier and load everything else strictly into a classifier-less model
        classifiers = timm.models.get_pretrained_cfg_value(name, 'classifier') or ()
        prefixes = tuple(f'{c}.' for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
        overlay.update(state_dict={k: v for k, v in state_dict.items() if not k.startswith(prefixes)}, num_classes=0)
        kwargs['num_classes'] = 0
    try:
        return _create(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # HAT-Net checks the fit itself and raises CheckpointError
        details = re.sub(r'^Error\(s\) in loading state_dict for \w+: ', '', ' '.join(str(e).split()))
        raise CheckpointError(f'{pretrained} does not fit {name}: {details[:300]}') from None


class ScaleHead(nn.Sequential):
    """3x3 conv + norm + ReLU (+ 2x bilinear upsampling) per halving of the stride, down to the output stride."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, out_stride: int, norm_layer):
        layers = []
        for i in range(max(1, int(math.log2(stride // out_stride)))):
            layers.append(Conv2dNormActivation(in_chs if i == 0 else out_chs, out_chs, 3, norm_layer=norm_layer))
            if stride > out_stride:
                layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
        super().__init__(*layers)


class SemanticFPN(nn.Module):
    """Semantic FPN segmentation model: timm backbone -> FPN -> scale heads -> per-pixel logits.

    Args:
        backbone: timm model name; any model whose ``features_only`` version has stride 4/8/16/32 features.
        num_classes: number of output classes.
        pretrained: ImageNet checkpoint file for the backbone (see :func:`create_backbone`).
        fpn_channels: FPN width (256 in the paper).
        head_channels: width of the scale heads (128 in the paper).
        norm: 'gn' (GroupNorm, 32 groups; independent of the batch size) or 'bn' (BatchNorm) in the scale heads.
        dropout: channel dropout before the classifier.
        drop_path_rate: stochastic depth of the backbone (None: the model's default).
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            pretrained: Optional[Union[str, Path]] = None,
            fpn_channels: int = 256,
            head_channels: int = 128,
            norm: str = 'gn',
            dropout: float = 0.1,
            drop_path_rate: Optional[float] = None,
    ):
        super().__init__()
        if norm not in ('gn', 'bn'):
            raise HatNetError(f"norm must be 'gn' or 'bn', got {norm!r}")
        if num_classes < 1:
            raise HatNetError(f'num_classes must be at least 1, got {num_classes}')
        self.num_classes = num_classes
        self.backbone = create_backbone(backbone, pretrained, drop_path_rate)

        # the last feature at each FPN stride (e.g. resnet's stride-2 stem feature is skipped)
        reductions = self.backbone.feature_info.reduction()
        missing = [s for s in FPN_STRIDES if s not in reductions]
        if missing:
            raise HatNetError(f'backbone {backbone} has no features at stride {missing} '
                              f'(its feature strides are {reductions}); Semantic FPN needs strides {FPN_STRIDES}')
        self.feature_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in FPN_STRIDES]
        in_channels = [self.backbone.feature_info.channels()[i] for i in self.feature_indices]

        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        norm_layer = partial(nn.GroupNorm, 32) if norm == 'gn' else nn.BatchNorm2d
        self.scale_heads = nn.ModuleList([
            ScaleHead(fpn_channels, head_channels, stride, FPN_STRIDES[0], norm_layer) for stride in FPN_STRIDES])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        # small initial logits (as mmsegmentation): the first loss is ~log(num_classes), not a large random one
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    @property
    def pretrained_cfg(self) -> dict:
        """The backbone's timm pretrained cfg (input normalisation mean / std)."""
        return self.backbone.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        pyramid = self.fpn(OrderedDict((str(s), features[i]) for s, i in zip(FPN_STRIDES, self.feature_indices)))
        levels = [head(level) for head, level in zip(self.scale_heads, pyramid.values())]
        out = levels[0]
        for y in levels[1:]:
            # odd input sizes make the upsampled levels differ by a pixel from the stride-4 map
            out = out + F.interpolate(y, size=out.shape[-2:], mode='bilinear', align_corners=False)
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)
