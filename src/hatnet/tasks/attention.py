"""Where H-MHSA looks: the attention probabilities of one query in one block, and a picture of them."""
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import HatNetError
from ..fileio import save_figure


def attention_probabilities(model: nn.Module, image: torch.Tensor, stage: int, block: int,
                            query: Tuple[float, float]) -> Dict[str, Any]:
    """Where one query location of a block's H-MHSA looks, per head.

    A forward hook captures the attention module's input and output; the probabilities come from the module
    itself (``HierarchicalAttention.attention_maps``, the forward's own cell gathering and masks).

    image: one transformed image (C, H, W); query: (x, y) pixel of that image.
    Returns ``query`` (row, column of its token on the stage's ``map_size`` grid); ``local`` (heads, cell rows,
    cell cols) and ``cell`` (top row, left column) for the grid step; ``global`` (heads, pooled rows, pooled
    cols) and ``pool`` (pooling window side) for the pooled step, or ``global`` (heads, rows, cols) over the
    whole map if the stage has no grid; ``x`` and ``output``: the module's input and output.
    """
    attn = model.stages[stage].blocks[block].attn
    captured = {}
    handle = attn.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0], out=output))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(image[None].to(device))
    finally:
        handle.remove()
    x = captured['x']
    with torch.no_grad():
        maps = attn.attention_maps(x)
    height, width = maps['map_size']
    stride = model.feature_info[stage]['reduction']
    row, col = min(int(query[1]) // stride, height - 1), min(int(query[0]) // stride, width - 1)
    result = dict(x=x, output=captured['out'], map_size=(height, width), query=(row, col))
    token_probs = maps['global'][0, :, row * width + col].cpu()  # (heads, keys)
    if 'local' not in maps:  # plain global self-attention over the whole map
        result['global'] = token_probs.reshape(-1, height, width)
        return result
    # the query's cell and its place in it; a ragged edge cell shows only its valid tokens
    size = maps['grid_size']
    top, left = row // size * size, col // size * size
    cell_probs = maps['local'][0, (row // size) * maps['grid'][1] + col // size, :, (row - top) * size + col - left]
    result['local'] = cell_probs.reshape(-1, size, size)[:, :height - top, :width - left].cpu()
    result['cell'] = (top, left)
    result['global'] = token_probs.reshape(-1, *maps['pooled_size'])
    result['pool'] = attn.pool.kernel_size
    return result


def attention_blocks(model: nn.Module) -> List[Tuple[int, int]]:
    """(stage, block) of every H-MHSA block of a HAT-Net model."""
    if not (hasattr(model, 'stages') and all(hasattr(s, 'blocks') for s in model.stages)) or not any(
            hasattr(b, 'attn') and hasattr(b.attn, 'grid_size') for s in model.stages for b in s.blocks):
        raise HatNetError('attention maps need a hat_net model')
    return [(i, j) for i, s in enumerate(model.stages) for j in range(len(s.blocks))]


def _token_map(result: Dict[str, Any], key: str) -> np.ndarray:
    """Head-averaged probabilities of one step on the stage's token grid (NaN outside the local cell)."""
    probs = result[key].mean(0).numpy()
    height, width = result['map_size']
    if key == 'local':
        top, left = result['cell']
        full = np.full((height, width), np.nan)
        full[top:top + probs.shape[0], left:left + probs.shape[1]] = probs
        return full
    if 'pool' in result:  # every token of a pooling window shows that pooled token's probability
        probs = probs.repeat(result['pool'], 0).repeat(result['pool'], 1)[:height, :width]
    return probs


def plot_attention(image: np.ndarray, result: Dict[str, Any], path, title: str = '') -> None:
    """Image with the query, then the grid (local) and pooled (global) attention averaged over heads."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img_h, img_w = image.shape[:2]
    height, width = result['map_size']
    sy, sx = img_h / height, img_w / width  # image pixels per token
    row, col = result['query']
    panels = [('query', None)]
    if 'local' in result:
        cell_h, cell_w = result['local'].shape[-2:]
        panels.append((f'local step: within its {cell_h}x{cell_w}-token grid cell', 'local'))
        pooled_h, pooled_w = result['global'].shape[-2:]
        panels.append((f'global step: to {pooled_h}x{pooled_w} pooled tokens', 'global'))
    else:
        panels.append((f'global attention to all {height}x{width} tokens', 'global'))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (label, key) in zip(axes, panels):
        ax.imshow(image)
        if key is not None:
            shown = ax.imshow(_token_map(result, key), cmap='inferno', alpha=0.6, extent=(0, img_w, img_h, 0),
                              interpolation='nearest')
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label='attention probability')
        if key == 'local':
            top, left = result['cell']
            ax.add_patch(Rectangle((left * sx, top * sy), cell_w * sx, cell_h * sy, fill=False,
                                   edgecolor='yellow', linewidth=1.5))
        ax.plot((col + 0.5) * sx, (row + 0.5) * sy, marker='x', color='cyan', markersize=10, markeredgewidth=2.5)
        ax.set_title(label, fontsize=9)
        ax.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
