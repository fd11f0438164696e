"""The allocator setting for processing workers."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_reuses_large_blocks():
    # in a fresh process: after the setting, freeing and re-allocating a 64 MB plane
    # does not fault its pages in again (minor faults stay far below 64 MB / 4 kB)
    code = """
import resource, numpy as np
from archive.pipeline.runtime import keep_freed_memory
assert keep_freed_memory() and keep_freed_memory()
a = np.ones(16 * 2**20, np.float32); del a
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(16 * 2**20, np.float32); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
    faults = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert faults < 100, faults  # without it: 2,720 here (huge pages), ~80,000 with 4 kB pages

