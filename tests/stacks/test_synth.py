"""The mock synthesis works whatever asyncio state earlier code in the process left."""

from __future__ import annotations

import asyncio

from stacks.config import StackSettings
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
