"""Fixtures every air-gap test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.airgap.servers import OPEN_FETCHERS


@pytest.fixture(autouse=True)
def _close_fetchers() -> Iterator[None]:
    yield
    while OPEN_FETCHERS:
        OPEN_FETCHERS.pop().close()
