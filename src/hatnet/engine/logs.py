"""A run's logs: ``metrics.csv`` (one row per evaluation), TensorBoard if installed, ``curves.png``.

The rows live in the training checkpoint too, so after a resume ``metrics.csv`` is rewritten from them and
holds exactly the rows an uninterrupted run would have written.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..fileio import save_figure, write_csv_atomic

METRICS_CSV = 'metrics.csv'
CURVES_PNG = 'curves.png'
TENSORBOARD = 'tensorboard'


class RunLog:
    """Writes the logs of rank 0 (construct it on rank 0 only)."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        self.run_dir = run_dir
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def write_csv(self, history: List[Dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(k for row in history for k in row))
        write_csv_atomic(self.run_dir / METRICS_CSV, columns, [[row.get(c, '') for c in columns] for row in history])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(history: List[Dict[str, Any]], path: Path, primary: str = '') -> None:
    """Losses, validation metrics and learning rate against optimiser steps, one panel each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    steps = [row['step'] for row in history]
    numeric = [k for k in history[-1] if isinstance(history[-1][k], (int, float)) and k not in ('epoch', 'step')]
    losses = [k for k in numeric if k.endswith('loss')]
    metrics = [k for k in numeric if k.startswith('val_') and k not in losses]
    metrics.sort(key=lambda k: (primary not in k, k))  # the primary metric first: it sets the colours
    panels = [('loss', losses), ('validation metrics', metrics[:8]), ('learning rate', ['lr'])]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [row.get(key) for row in history], marker='o' if len(steps) < 30 else None,
                    markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel('optimiser step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
