"""The example air-gapped profile pointed at a QEMU user-network world, for the node image
test and benchmark: its local mirror is the allowed canary (10.0.2.100:80), its admin
network is QEMU's (ssh arrives from 10.0.2.2), and its admin key is the caller's."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]


def loopback_profile(name: str, public_key: Path, directory: Path) -> Path:
    yaml = YAML()
    document = yaml.load((ROOT / "profiles/air-gapped.yaml").read_text())
    document["name"] = name
    document["host"]["admin_keys"] = [public_key.read_text().strip()]
    network = document["network"]
    network["hosts"] = {"mirror.ward.internal": "10.0.2.100"}
    network["admin_networks"] = ["10.0.2.0/24"]
    network["egress"]["allow"] = [
        {"to": "mirror.ward.internal:80", "protocol": "tcp", "description": "the local mirror"}
    ]
    document["mirrors"] = [
        {"kind": kind, "url": f"http://mirror.ward.internal/{kind}/"}
        for kind in ("pypi", "oci", "debian", "models")
    ]
    path = directory / f"{name}.yaml"
    with path.open("w") as sink:
        yaml.dump(document, sink)
    return path
