"""The mock synthesis works whatever asyncio state earlier code in the process left."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from stacks.config import StackSettings
from stacks.synth import PROJECT_DIR
from tests.stacks.harness import synth


def test_synthesis_after_asyncio_run_left_no_event_loop() -> None:
    """`asyncio.run` leaves the main thread without a current loop, as the gateway's
    tests do when they run first in the same session."""
    asyncio.run(asyncio.sleep(0))
    seen: list[StackSettings] = []
    synth(seen.append)
    assert [settings.profile.name for settings in seen] == ["sovereign-dc1"]
    synth(seen.append)
    assert len(seen) == 2


def test_synthesis_leaves_the_callers_event_loop_state_alone() -> None:
    """In a fresh process where nothing has set an event loop, a synthesis followed by
    `asyncio.run` (which replaces the main thread's loop) leaves no loop and none of its
    sockets to be collected unclosed. (The synthesis thread's own loops go only with the
    interpreter, after the marker.)"""
    script = (
        "import asyncio, gc, sys\n"
        "from tests.stacks.harness import synth\n"
        "synth(lambda settings: None)\n"
        "asyncio.run(asyncio.sleep(0))\n"
        "gc.collect()\n"
        "print('collected', file=sys.stderr, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", script],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    before_exit, marker, _ = result.stderr.partition("collected\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker, result.stderr[-2000:]
    assert "ResourceWarning" not in before_exit, before_exit[-2000:]
