"""``hatnet bench``: throughput, batch-1 latency, peak memory and MACs of HAT-Net and timm peers, side by side."""
from .measure import describe_machine, keep_freed_memory, load_average, peak_memory_mb
from .report import plot, table, write_csv
from .runner import (DEFAULT_MODELS, DEFAULT_RESOLUTIONS, GLOBAL_SUFFIX, BenchConfig, BenchRow, build_model,
                     parse_resolution, run_bench)
from .runtimes import DTYPES, RUNTIMES, RunSettings, compile_model, make_runner

__all__ = [
    'BenchConfig', 'BenchRow', 'DEFAULT_MODELS', 'DEFAULT_RESOLUTIONS', 'DTYPES', 'GLOBAL_SUFFIX', 'RUNTIMES',
    'RunSettings', 'build_model', 'compile_model', 'describe_machine', 'keep_freed_memory', 'load_average', 'make_runner',
    'parse_resolution', 'peak_memory_mb', 'plot', 'run_bench', 'table', 'write_csv',
]
