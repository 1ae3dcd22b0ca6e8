import timm
import torch
import torch.nn.functional as F
from torch import nn

from hatnet.complexity import count_macs
from hatnet.models.runtime import optimize_for_cpu


class SmallNet(nn.Module):
    """One of every kind of layer count_macs has a rule for, with MACs that can be written down by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(1, 8)
        self.batch_norm = nn.BatchNorm2d(8)
        self.layer_norm = nn.LayerNorm(8, elementwise_affine=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.batch_norm(self.group_norm(self.conv(x)))
        tokens = self.layer_norm(x.flatten(2).transpose(1, 2))[:, None]  # (1, 1, H * W, 8): one head
        x = x + F.scaled_dot_product_attention(tokens, tokens, tokens).squeeze(1).transpose(1, 2).view(x.shape)
        x = F.interpolate(x, scale_factor=2, mode='bilinear')
        return self.fc(x.mean((2, 3)))


def test_every_rule_counts_what_it_should():
    h, w = 6, 10
    pixels = h * w
    layers = (8 * 3 * 9 * pixels  # convolution (bias not counted)
              + 5 * 8 * pixels  # group norm with affine
              + 2 * 8 * pixels  # batch norm in inference
              + 4 * 8 * pixels  # layer norm without affine
              + 4 * 8 * 4 * pixels  # bilinear upsampling: 4 per output element
              + 8 * 4 * pixels  # the mean: 1 per input element
              + 8 * 4)  # linear
    attention = pixels * pixels * (8 + 8)  # q·kᵀ and attn·v
    macs = count_macs(SmallNet(), (3, h, w))
    assert macs == dict(layers=layers, attention=attention, total=layers + attention)


def _ceil_div(a, b):
    return -(-a // b)


def test_hat_net_counts_every_attention_product_and_not_its_cpu_form():
    model = timm.create_model('hat_net_tiny')
    height, width = 230, 250  # ragged edge cells in every stage with a grid
    plain = count_macs(model, (3, height, width))
    attention = 0
    for i, stage in enumerate(model.stages):
        h, w = _ceil_div(height, 2 ** (i + 2)), _ceil_div(width, 2 ** (i + 2))
        for block in stage.blocks:
            attn, dim = block.attn, block.attn.num_heads * block.attn.head_dim
            if attn.grid_size == 1:  # every token to every token
                attention += (h * w) ** 2 * dim * 2
            else:  # inside whole (padded) cells, then every token to the pooled tokens
                cells, tokens = _ceil_div(h, attn.grid_size) * _ceil_div(w, attn.grid_size), attn.grid_size ** 2
                ratio = attn.pool.stride
                attention += cells * tokens ** 2 * dim * 2 + h * w * _ceil_div(h, ratio) * _ceil_div(w, ratio) * dim * 2
    assert plain['attention'] == attention
    optimize_for_cpu(model)  # its MLP runs fused convolution + SiLU calls on CPU
    assert count_macs(model.to(memory_format=torch.channels_last), (3, height, width)) == plain


def test_counting_leaves_every_module_in_its_mode():
    model = SmallNet().train()
    model.batch_norm.eval()  # e.g. frozen statistics inside a model that trains
    count_macs(model, (3, 6, 10))
    assert model.training and model.conv.training and not model.batch_norm.training
