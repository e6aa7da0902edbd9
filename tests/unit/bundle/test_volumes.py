"""A bundle cut into volumes and joined again, and every way a volume set is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.contract import load_private_key
from typer.testing import CliRunner

from sovereign.bundle.layout import BLOBS, BundleError
from sovereign.bundle.manifest import verify
from sovereign.bundle.volumes import join, parse_size, split
from sovereign.cli import app
from tests.unit.bundle.test_bundle import _create, _image


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def bundle(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    # A 3 MiB disk makes the bundle span several 1 MiB volumes.
    disk = bytes(range(256)) * (3 * 4096)
    return _create(tmp_path, key, image=_image(tmp_path, disk=disk))


def test_volumes_stay_under_the_limit_and_join_back_into_the_same_bundle(
    tmp_path: Path, key: Ed25519PrivateKey, bundle: Path
) -> None:
    volumes, digest = split(bundle, tmp_path / "vols", 1 << 20, key)
    assert len(volumes) >= 4
    assert all(v.size <= 1 << 20 for v in volumes)
    assert all(v.size == 1 << 20 for v in volumes[:-1])
    files = sorted(p.name for p in (tmp_path / "vols").iterdir())
    assert files == sorted([v.name for v in volumes] + ["volumes.json", "volumes.json.sig"])

    joined = tmp_path / "joined"
    assert join(tmp_path / "vols", joined, key.public_key()) == digest
    assert verify(joined, key.public_key()).ok
    for blob in (bundle / BLOBS).iterdir():
        assert (joined / BLOBS / blob.name).read_bytes() == blob.read_bytes()


@pytest.mark.parametrize("damage", ["flip", "drop", "extra", "listing", "reorder"])
def test_a_damaged_volume_set_is_refused_before_anything_is_unpacked(
    tmp_path: Path, key: Ed25519PrivateKey, bundle: Path, damage: str
) -> None:
    volumes, _ = split(bundle, tmp_path / "vols", 1 << 20, key)
    folder = tmp_path / "vols"
    second = folder / volumes[1].name
    if damage == "flip":
        data = bytearray(second.read_bytes())
        data[1000] ^= 1
        second.write_bytes(bytes(data))
        expected = f"{volumes[1].name}: sha256"
    elif damage == "drop":
        second.unlink()
        expected = f"volumes missing ['{volumes[1].name}']"
    elif damage == "extra":
        (folder / "bundle.vol099.tar").write_bytes(b"x")
        expected = "unexpected ['bundle.vol099.tar']"
    elif damage == "listing":
        listing = json.loads((folder / "volumes.json").read_text())
        listing["volumes"][0]["size"] += 1
        (folder / "volumes.json").write_text(json.dumps(listing))
        expected = "volumes.json: the signature does not match its content"
    else:
        first = folder / volumes[0].name
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
        expected = f"{volumes[0].name}: sha256"
    with pytest.raises(BundleError) as caught:
        join(folder, tmp_path / "joined", key.public_key())
    assert expected in str(caught.value)
    assert not (tmp_path / "joined").exists()
    assert not list(tmp_path.glob(".joined.staging-*"))


def test_volumes_signed_by_another_key_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, bundle: Path
) -> None:
    split(bundle, tmp_path / "vols", 1 << 20, key)
    with pytest.raises(BundleError, match=r"volumes\.json\.sig: signed by key"):
        join(tmp_path / "vols", tmp_path / "joined", Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    ("text", "size"), [("4G", 4 << 30), ("700M", 700 << 20), ("1048576", 1 << 20)]
)
def test_volume_sizes_are_read(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4GB", "-1M", "512K", "lots"])
def test_a_bad_volume_size_is_refused(text: str) -> None:
    with pytest.raises(BundleError, match="--volume-size"):
        parse_size(text)


def test_the_cli_splits_and_joins(tmp_path: Path, bundle: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "k.pem"
    assert runner.invoke(app, ["keys", "create", str(key)]).exit_code == 0
    # The fixture's bundle is signed by another key: split checks the signature first.
    refused = runner.invoke(
        app, ["bundle", "split", str(bundle), "--volume-size", "1M", "--out", str(tmp_path / "v"),
              "--key", str(key)],
    )  # fmt: skip
    assert refused.exit_code == 2
    assert "bundle.json.sig: signed by key" in refused.stderr
    assert not (tmp_path / "v").exists()
    own = _create(tmp_path, load_private_key(key), out="own", image=_image(tmp_path))
    vols = tmp_path / "v"
    done = runner.invoke(
        app, ["bundle", "split", str(own), "--volume-size", "1M", "--out", str(vols),
              "--key", str(key)],
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert "volume(s) in" in done.stdout
    joined = runner.invoke(
        app, ["bundle", "join", str(vols), "--out", str(tmp_path / "j"),
              "--trust", str(key.with_suffix(".pub"))],
    )  # fmt: skip
    assert joined.exit_code == 0, joined.stderr
    assert f"✓ bundle {tmp_path / 'j'} rebuilt and verified" in joined.stdout


def test_a_bundle_that_does_not_verify_is_not_split(
    tmp_path: Path, key: Ed25519PrivateKey, bundle: Path
) -> None:
    blob = next((bundle / BLOBS).iterdir())
    blob.write_bytes(blob.read_bytes() + b"!")
    with pytest.raises(BundleError, match="does not verify, so it is not split"):
        split(bundle, tmp_path / "vols", 1 << 20, key)
    assert not (tmp_path / "vols").exists()


def test_more_volumes_than_the_names_allow_is_refused_up_front(
    tmp_path: Path, key: Ed25519PrivateKey, bundle: Path
) -> None:
    with pytest.raises(BundleError, match="more than 999 volumes"):
        split(bundle, tmp_path / "vols", 2048, key)
    assert not list(tmp_path.glob("*vols*"))
