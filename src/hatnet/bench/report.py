"""Outputs of a benchmark: CSV, PNG plots against pixels, and a rich table with ratios to the baseline."""
import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from rich.table import Table
from rich.text import Text

from ..fileio import save_figure, write_csv_atomic
from .runner import BenchRow


def write_csv(rows: Sequence[BenchRow], path: Path, conditions: Dict[str, object]) -> None:
    """One line per row; the run's conditions (machine, threads, dtype, ...) repeated in every line."""
    fields = [f.name for f in dataclasses.fields(BenchRow)]
    write_csv_atomic(path, fields + ['pixels'] + list(conditions), [
        [getattr(row, name) for name in fields] + [row.pixels] + list(conditions.values()) for row in rows])


def _series(rows: Sequence[BenchRow], metric: str) -> Dict[str, List[tuple]]:
    series: Dict[str, List[tuple]] = {}
    for row in rows:
        value = getattr(row, metric)
        if row.status == 'ok' and not math.isnan(value):
            series.setdefault(row.label, []).append((row.pixels / 1e6, value))
    return series


def plot(rows: Sequence[BenchRow], path: Path, metric: str, ylabel: str, title: str) -> None:
    """Log-log plot of ``metric`` against megapixels, one line per model, with slope-1 and slope-2 guides."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    series = _series(rows, metric)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, points in series.items():
        x, y = zip(*sorted(points))
        style = '--' if label.startswith('hat_net') and '-global' in label else '-'
        ax.plot(x, y, style, marker='o', label=label, linewidth=2.2 if label.startswith('hat_net') else 1.2)
    if series:
        # guides through the first point of the first series: cost linear / quadratic in pixels
        x0, y0 = min(next(iter(series.values())))
        xs = [x0, max(p[0] for pts in series.values() for p in pts)]
        sign = -1 if metric == 'img_per_s' else 1
        for power, name in ((1, 'linear in pixels'), (2, 'quadratic in pixels')):
            ax.plot(xs, [y0 * (x / x0) ** (sign * power) for x in xs], ':', color='grey', linewidth=1)
            ax.annotate(name, (xs[1], y0 * (xs[1] / x0) ** (sign * power)), fontsize=8, color='grey')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('megapixels per image')
    ax.set_ylabel(ylabel)
    ax.set_title('\n'.join(textwrap.fill(line, 100) for line in title.splitlines()), fontsize=8)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(value: float, spec: str) -> str:
    return '-' if math.isnan(value) else format(value, spec)


def table(rows: Sequence[BenchRow], baseline: str, title: str) -> Table:
    t = Table(title=title, title_justify='left')
    compiled = any(row.runtime == 'compile' for row in rows)
    for column in ('model', 'input', 'batch', 'img/s', f'× {baseline}', 'latency bs1 (ms)', 'peak mem (MiB)',
                   'GMACs', 'params (M)', 'max |Δ| vs eager fp32') + (('compile (s)',) if compiled else ()) + ('status',):
        t.add_column(column, justify='left' if column in ('model', 'input', 'status') else 'right')
    previous = None
    for row in rows:
        if previous is not None and (row.height, row.width) != previous:
            t.add_section()
        previous = (row.height, row.width)
        ratio = _fmt(row.ratio, '.2f')
        # Text cells: model names and error messages are shown as they are, never read as rich markup
        t.add_row(Text(row.label), f'{row.height}x{row.width}', str(row.batch), _fmt(row.img_per_s, '.2f'),
                  Text(ratio, style='bold' if row.label == baseline else ''), _fmt(row.latency_ms, '.1f'),
                  _fmt(row.peak_memory_mb, '.0f'), _fmt(row.gmacs, '.2f'), _fmt(row.params_m, '.1f'),
                  _fmt(row.max_abs_diff, '.1e'), *([_fmt(row.compile_s, '.0f')] if compiled else []),
                  Text(row.status, style='' if row.status == 'ok' else 'yellow'))
    return t


def compare_table(rows: Sequence[BenchRow], pairs: Sequence[Tuple[str, str]]) -> Table:
    """img/s of each model over its peer's, per setting (runtime, dtype, mode) and input size."""
    t = Table(title='img/s ratios, measured interleaved in the same rounds', title_justify='left')
    for column in ('setting', 'input', *(f'{a} / {b}' for a, b in pairs)):
        t.add_column(column, justify='left' if column in ('setting', 'input') else 'right')
    speed = {(r.model, r.setting, r.height, r.width): r.img_per_s for r in rows if r.status == 'ok'}
    for setting, height, width in dict.fromkeys((r.setting, r.height, r.width) for r in rows):
        ratios = [speed.get((a, setting, height, width), math.nan) / speed.get((b, setting, height, width), math.nan)
                  for a, b in pairs]
        t.add_row(Text(', '.join(setting)), f'{height}x{width}', *(_fmt(ratio, '.2f') for ratio in ratios))
    return t
