"""What a worker loads at start-up is out of the garbage collector's reach (xraybatch.loop.warm_up). The check
runs in its own interpreter, as a worker does, so that this test process keeps its own collector."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_warm_up_takes_the_loaded_objects_out_of_the_collectors_reach() -> None:
    out = _run("""
        import gc
        from xraybatch.loop import warm_up
        assert gc.get_freeze_count() == 0
        warm_up()
        print(gc.get_freeze_count(), len(gc.get_objects()))
    """)
    frozen, tracked = map(int, out.split())
    assert frozen > 100_000  # torch, highdicom, pytorch-grad-cam and their modules
    assert tracked < frozen / 10, "the collector still walks what start-up loaded"
