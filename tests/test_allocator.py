"""The allocator setting: after keep_freed_memory, freed large tensors' pages serve the next step's."""

import subprocess
import sys
import textwrap

import pytest

from neurocl.allocator import _glibc

# A step of 64 MB float32 tensors (16384 pages of 4 KiB each): glibc maps every one fresh and
# faults its pages in, step after step, unless it keeps freed memory; then, once the heap has grown
# to the step's size, a step reuses the last one's pages. (A single freed tensor is not enough to
# show it: torch asks for aligned blocks, slightly larger than the hole the last one left.)
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from neurocl.allocator import describe_allocator, keep_freed_memory
    outcome = keep_freed_memory() if sys.argv[1] == "keep" else "not asked"
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for step in range(8):
        before = faults()
        x = torch.ones(16 * 2**20)
        y = (x * 2 + 1).half().float()
        del x, y
    print(outcome, "|", describe_allocator(), "|", faults() - before)
""")


def _last_step_faults(mode: str, env: dict | None = None) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    outcome, described, faults = (part.strip() for part in out.strip().split("|"))
    return outcome, described, int(faults)


@pytest.mark.skipif(_glibc() is None, reason="the setting is glibc's")
def test_kept_memory_serves_the_next_steps_tensors_without_page_faults():
    outcome, described, kept = _last_step_faults("keep")
    assert (outcome, described) == ("applied", "malloc keeps freed memory")
    _, described, fresh = _last_step_faults("default")
    assert described == "malloc as it was (not asked)"
    assert fresh > 10_000  # every 64 MB block mapped anew: 16384 pages faulted in, at least
    assert kept < 1_000


@pytest.mark.skipif(_glibc() is None, reason="the setting is glibc's")
def test_the_user_can_turn_it_off_or_choose_their_own(monkeypatch):
    import os

    for name, value, expected in [("NEUROCL_KEEP_FREED_MEMORY", "0", "off: NEUROCL_KEEP_FREED_MEMORY=0"),
                                  ("MALLOC_MMAP_MAX_", "65536", "skipped: MALLOC_MMAP_MAX_ is set"),
                                  ("LD_PRELOAD", "libjemalloc.so.2", "skipped: an allocator is preloaded (LD_PRELOAD)")]:
        env = {**os.environ, name: value}
        outcome, described, faults = _last_step_faults("keep", env)
        assert outcome == expected and described == f"malloc as it was ({expected})"
        assert faults > 10_000


def test_the_command_line_applies_it_and_benchmarks_say_so():
    out = subprocess.run([sys.executable, "-m", "neurocl", "bench", "patches", "--quick", "--libraries", "neurocl"],
                         capture_output=True, text=True, check=True)
    expected = "malloc keeps freed memory" if _glibc() is not None else "malloc as it was (skipped: not glibc)"
    assert expected in out.stdout + out.stderr
