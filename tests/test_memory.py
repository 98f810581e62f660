"""Large buffers go back to the operating system (proxy/memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy.memory import return_large_buffers

# A child that frees many 4 MiB buffers with small objects allocated after them, as a burst of
# big upstream events does, and prints how much of the peak it still holds.
CHILD = """
import sys
from proxy.memory import return_large_buffers
if sys.argv[1] == "fixed":
    return_large_buffers()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
base = rss()
for _ in range(3):
    big = [bytearray(4 * 1024 * 1024) for _ in range(30)]
    small = [bytes(100) for _ in range(20000)]
    del big
peak_left = rss() - base
print(peak_left // (1024 * 1024))
"""


def held_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_large_buffers_do_not_stay_in_the_process() -> None:
    assert held_mib("fixed") < 20


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0:glibc.malloc.mmap_threshold=65536"),
    ],
    ids=["malloc-variable", "glibc-tunable"],
)
def test_an_operator_who_set_the_threshold_keeps_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv(name, value)
    assert return_large_buffers() is False
