"""The process-wide CPU settings of the trainer: keep_freed_memory (a freed large block is reused by the next
allocation, not returned to the OS and faulted in again) and flush_denormals."""
import subprocess
import sys

import pytest
import torch

# malloc, touch and free a 64 MiB block twice and count the minor page faults of the second round: with
# glibc's defaults, then (in the same process: one start-up instead of two) with keep_freed_memory
SECOND_ROUND_FAULTS = '''
import ctypes, resource
from hatnet.models.runtime import keep_freed_memory
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touch():
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
def second_round_faults():
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = second_round_faults()
assert keep_freed_memory()
print(default, second_round_faults())
'''
PAGES = (64 << 20) // 4096


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_a_freed_large_block_is_reused_without_page_faults():
    # glibc's default maps such a block afresh and unmaps it on free; trimming the heap on free (what a
    # threshold that wrapped around to 0 did) returns it too: either way every page faults again
    out = subprocess.run([sys.executable, '-c', SECOND_ROUND_FAULTS], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split()[-2:])
    assert default > PAGES // 2
    assert kept < PAGES // 10


# setting the default (off) tells whether the CPU has the mode at all
NEEDS_FLUSH_MODE = pytest.mark.skipif(not torch.set_flush_denormal(False), reason='no flush-to-zero mode on this CPU')

FLUSHED = '''
import torch
from hatnet.models.runtime import flush_denormals
subnormal = torch.tensor([1e-39, -3e-40])  # below float32's smallest normal value, 1.2e-38
before = (subnormal * 1.5).abs().min().item()
print(before, flush_denormals(), (subnormal * 1.5).abs().max().item())
'''


@NEEDS_FLUSH_MODE
def test_flush_denormals_makes_subnormal_floats_zero():
    # in a child process: the setting would outlive the test
    out = subprocess.run([sys.executable, '-c', FLUSHED], capture_output=True, text=True, check=True)
    before, supported, after = out.stdout.split()
    assert float(before) > 0 and supported == 'True' and float(after) == 0


EVERY_THREAD = '''
import torch
from hatnet.cli import main
try:
    main(['info'])
except SystemExit:
    pass
torch.set_num_threads(2)
print(int((torch.full((1 << 22,), 1e-39) * 1.5 != 0).sum()))  # a parallel operator: every worker thread
'''


@NEEDS_FLUSH_MODE
def test_the_hatnet_command_flushes_subnormals_in_every_worker_thread():
    # the mode is per thread: set after the worker threads have started, it would miss all but the caller
    out = subprocess.run([sys.executable, '-c', EVERY_THREAD], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == '0'
