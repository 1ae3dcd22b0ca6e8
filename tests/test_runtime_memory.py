"""keep_freed_memory: a freed large block is reused by the next allocation, not returned to the OS and faulted in again."""
import subprocess
import sys

import pytest

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
