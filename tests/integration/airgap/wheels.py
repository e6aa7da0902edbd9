"""Real, installable wheels built in the test: a module, METADATA, WHEEL and RECORD.

Built here because the tests may reach nothing but loopback, so no build backend can be
fetched; pip installs these like any other wheel.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    tag: str = "py3-none-any",
    licence: str | None = None,
    classifier: str | None = None,
    padding: int = 0,
) -> Path:
    """`padding` adds that many incompressible bytes, for transfers slow enough to interrupt."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n"
    if licence:
        metadata += f"License-Expression: {licence}\n"
    if classifier:
        metadata += f"Classifier: {classifier}\n"
    pure = tag.endswith("-none-any")
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\nTAG = {tag!r}\n".encode(),
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: sovereign-tests\n"
            f"Root-Is-Purelib: {'true' if pure else 'false'}\nTag: {tag}\n"
        ).encode(),
    }
    if padding:
        files[f"{module}/padding.bin"] = hashlib.shake_256(name.encode()).digest(padding)
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
