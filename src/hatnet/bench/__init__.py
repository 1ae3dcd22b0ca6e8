"""``hatnet bench``: throughput, batch-1 latency, peak memory and MACs of HAT-Net and timm peers, side by side."""
from ..models.runtime import keep_freed_memory
from .measure import describe_machine, load_average, page_faults, peak_memory_mb
from .report import compare_table, plot, table, write_csv
from .runner import (DEFAULT_MODELS, DEFAULT_RESOLUTIONS, GLOBAL_SUFFIX, BenchConfig, BenchRow, build_model,
                     parse_pair, parse_resolution, run_bench, settle_heap, timm_name)
from .runtimes import DTYPES, MODES, RUNTIMES, RunSettings, compile_model, make_runner, make_train_step

__all__ = [
    'BenchConfig', 'BenchRow', 'DEFAULT_MODELS', 'DEFAULT_RESOLUTIONS', 'DTYPES', 'GLOBAL_SUFFIX', 'MODES', 'RUNTIMES',
    'RunSettings', 'build_model', 'compare_table', 'compile_model', 'describe_machine', 'keep_freed_memory',
    'load_average', 'make_runner', 'make_train_step', 'page_faults', 'parse_pair', 'parse_resolution',
    'peak_memory_mb', 'plot', 'run_bench', 'settle_heap', 'table', 'timm_name', 'write_csv',
]
