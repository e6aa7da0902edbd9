"""`sovereign token`: filled in by the gateway-boundary work."""

from __future__ import annotations
