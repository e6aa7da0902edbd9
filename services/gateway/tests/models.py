"""Where the gateway's tests find the embedded models, as `sovereign tools install minilm`
leaves them in the tools cache (`SOVEREIGN_TOOLS_DIR`, else `$XDG_CACHE_HOME/sovereign/tools`).

The gateway imports nothing of the toolkit, its tests included; the pins are repeated here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MINILM_DIR = "minilm-1.0.0"
MINILM_ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"


def tools_dir() -> Path:
    given = os.environ.get("SOVEREIGN_TOOLS_DIR")
    if given:
        return Path(given).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sovereign" / "tools"


def _installed(name: str) -> Path:
    path = tools_dir() / MINILM_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `sovereign tools install minilm`")
    return path


def minilm_onnx() -> Path:
    return _installed("model.onnx")


def minilm_tokenizer() -> Path:
    return _installed("tokenizer.json")
