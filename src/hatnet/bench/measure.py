"""Timing and memory primitives: wall time of a call, peak memory of a call, machine description."""
import ctypes
import os
import platform
import time
from typing import Callable, Optional, Tuple

import torch

from ..models.runtime import cpu_emulates_bf16


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by ``fn()``, including the device work it queued."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def page_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch); 0 where the OS
    does not count them."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that the RSS before a run is a tight baseline."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above what was in use before it, in MiB.

    CUDA: max allocated by PyTorch's allocator. CPU: peak resident set size (VmHWM, reset through
    /proc/self/clear_refs) minus the resident size before the call; NaN where /proc does not offer that.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    _release_free_heap()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        return float('nan')
    before = _read_status_kb('VmRSS')
    fn()
    peak = _read_status_kb('VmHWM')
    if before is None or peak is None:
        return float('nan')
    return max(peak - before, 0) / 1024


def describe_machine(device: torch.device) -> str:
    """CPU model and vector extensions (or the GPU name) for the report."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name, flags = platform.processor() or 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name':
                    name = value.strip()
                elif key.strip() == 'flags':
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'
    extras = [f for f in ('avx512_bf16', 'amx_bf16') if f in flags]
    # without bf16 instructions, bf16 rows measure a software conversion, not the CPU's bf16 speed
    bf16 = f' ({", ".join(extras)})' if extras else ', no bf16 instructions' if cpu_emulates_bf16() else ''
    return f'{name}, {os.cpu_count()} CPUs, {vector}{bf16}'


def load_average() -> Tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float('nan'),) * 3
