"""The TPM KEK provider against swtpm, a real TPM 2.0 emulator: sealing to PCR 7, refusal after
a PCR change, rotation and migration to the TPM, another TPM, and no TPM at all."""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sovereign_gateway.memory import tpm
from sovereign_gateway.memory.envelope import Kek, KekSettings, KeyRing, new_data_key
from sovereign_gateway.memory.errors import KeyUnavailable

from tests.integration.swtpm import MISSING, Swtpm, free_port_pair, swtpm, wiretap

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not on PATH"),
]

DOC = "d" * 64
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def tpm_sim(tmp_path: Path) -> Iterator[Swtpm]:
    with swtpm(tmp_path / "tpm-state", tmp_path / "swtpm.log") as running:
        yield running


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the provider's context-file directories go, to check they are removed."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def tpm_settings(tmp_path: Path, tcti: str, pcrs: tuple[int, ...] = (7,)) -> KekSettings:
    return KekSettings(
        source="tpm", keyring=tmp_path / "data" / "keyring.json", tpm_tcti=tcti, tpm_pcrs=pcrs
    )


class Catalog:
    """Stands in for the lead's SQLite catalog: doc id -> (KEK version, wrapped data key)."""

    def __init__(self, ring: KeyRing, documents: int = 3) -> None:
        self.data_keys = {f"{n:064x}": new_data_key() for n in range(documents)}
        self.rows = {
            d: (ring.current.version, ring.current.wrap(k, d)) for d, k in self.data_keys.items()
        }

    def rewrap(self, ring: KeyRing, new: Kek) -> int:
        self.rows = {
            d: (new.version, new.wrap(ring.kek(v).unwrap(w, d), d))
            for d, (v, w) in self.rows.items()
        }
        return len(self.rows)

    def assert_readable(self, ring: KeyRing) -> None:
        for d, (v, w) in self.rows.items():
            assert ring.kek(v).unwrap(w, d) == self.data_keys[d]


def sealed_from_keyring(settings: KekSettings, version: int) -> tpm.Sealed:
    entry = next(
        v for v in json.loads(settings.keyring.read_text())["versions"] if v["version"] == version
    )["tpm"]
    return tpm.Sealed(
        public=base64.b64decode(entry["public"]),
        private=base64.b64decode(entry["private"]),
        pcrs={int(i): bytes.fromhex(h) for i, h in entry["pcrs"].items()},
    )


def test_sealed_kek_unseals_on_the_next_open(
    tmp_path: Path, tpm_sim: Swtpm, private_tempdir: Path
) -> None:
    settings = tpm_settings(tmp_path, tpm_sim.tcti)
    data_key = new_data_key()
    wrapped = KeyRing.open(settings).current.wrap(data_key, DOC)
    assert KeyRing.open(settings, create=False).current.unwrap(wrapped, DOC) == data_key

    sealed = sealed_from_keyring(settings, 1)
    assert sealed.pcrs == tpm.read_pcrs(tpm_sim.tcti, [7])
    # The KEK is the secret the TPM holds, and it appears nowhere in keyring.json.
    kek = tpm.unseal(tpm_sim.tcti, sealed)
    assert Kek(1, kek).unwrap(wrapped, DOC) == data_key
    assert kek.hex().encode() not in settings.keyring.read_bytes()
    assert base64.b64encode(kek) not in settings.keyring.read_bytes()
    # Nothing left behind: no transient objects or sessions in the TPM, no context files.
    assert tpm_sim.tpm2("tpm2_getcap", "handles-transient").strip() == ""
    assert tpm_sim.tpm2("tpm2_getcap", "handles-saved-session").strip() == ""
    assert list(private_tempdir.iterdir()) == []


def test_the_kek_crosses_the_wire_encrypted(tmp_path: Path, tpm_sim: Swtpm) -> None:
    """Sealing and unsealing use sessions salted with the primary key, so someone on the
    TPM's bus sees neither the KEK nor anything derived from it in the clear."""
    with wiretap(tpm_sim) as (tcti, recorded):
        settings = tpm_settings(tmp_path, tcti)
        KeyRing.open(settings)
        KeyRing.open(settings, create=False)
        # The tap sees plain responses: random bytes from the TPM cross it in the clear.
        random = bytes.fromhex(tpm_sim.tpm2("tpm2_getrandom", "-T", tcti, "--hex", "32"))
    kek = tpm.unseal(tpm_sim.tcti, sealed_from_keyring(settings, 1))
    assert random in recorded
    assert kek not in recorded


def test_extending_the_sealed_pcr_refuses_to_unseal(tmp_path: Path, tpm_sim: Swtpm) -> None:
    settings = tpm_settings(tmp_path, tpm_sim.tcti)
    KeyRing.open(settings)
    tpm_sim.extend(7)
    with pytest.raises(KeyUnavailable) as caught:
        KeyRing.open(settings)
    assert str(caught.value) == (
        "the TPM refused to unseal the memory key: PCR 7 no longer matches the sealing policy"
    )
    assert tpm_sim.tpm2("tpm2_getcap", "handles-transient").strip() == ""


def test_extending_a_pcr_outside_the_policy_still_unseals(tmp_path: Path, tpm_sim: Swtpm) -> None:
    settings = tpm_settings(tmp_path, tpm_sim.tcti)
    data_key = new_data_key()
    wrapped = KeyRing.open(settings).current.wrap(data_key, DOC)
    tpm_sim.extend(16)
    assert KeyRing.open(settings).current.unwrap(wrapped, DOC) == data_key


def test_rotation_reseals_to_the_values_of_now(tmp_path: Path, tpm_sim: Swtpm) -> None:
    """Rotate while the PCRs still match: after a change the old version cannot be unsealed."""
    settings = tpm_settings(tmp_path, tpm_sim.tcti)
    ring = KeyRing.open(settings)
    catalog = Catalog(ring)
    ring.rotate(settings, catalog.rewrap)
    catalog.assert_readable(KeyRing.open(settings, create=False))

    # Extend PCR 16, then seal the next version to 7 and 16 as they are now.
    tpm_sim.extend(16)
    wider = tpm_settings(tmp_path, tpm_sim.tcti, (7, 16))
    assert KeyRing.open(settings).rotate(wider, catalog.rewrap) == 3
    catalog.assert_readable(KeyRing.open(wider, create=False))
    with pytest.raises(KeyUnavailable, match="the TPM with PCRs 7,16"):
        KeyRing.open(settings)

    tpm_sim.extend(16)
    with pytest.raises(KeyUnavailable, match="PCR 16 no longer matches the sealing policy"):
        KeyRing.open(wider)
    tpm_sim.extend(7)
    with pytest.raises(KeyUnavailable, match="PCRs 7, 16 no longer match the sealing policy"):
        KeyRing.open(wider)


def test_passphrase_to_tpm_migration(tmp_path: Path, tpm_sim: Swtpm) -> None:
    old = KekSettings(
        source="passphrase", keyring=tmp_path / "data" / "keyring.json", passphrase=PASSPHRASE
    )
    new = tpm_settings(tmp_path, tpm_sim.tcti)
    ring = KeyRing.open(old)
    catalog = Catalog(ring)
    assert ring.rotate(new, catalog.rewrap) == 3
    catalog.assert_readable(KeyRing.open(new, create=False))
    document = json.loads(new.keyring.read_text())
    assert [(v["version"], v["source"]) for v in document["versions"]] == [(2, "tpm")]
    with pytest.raises(KeyUnavailable, match="sovereign keys rotate"):
        KeyRing.open(old)


def test_failed_migration_to_the_tpm_keeps_the_key_file(tmp_path: Path, tpm_sim: Swtpm) -> None:
    old = KekSettings(
        source="file", keyring=tmp_path / "data" / "keyring.json", key_file=tmp_path / "k.key"
    )
    new = tpm_settings(tmp_path, tpm_sim.tcti)
    ring = KeyRing.open(old)
    catalog = Catalog(ring)

    def failing(ring: KeyRing, kek: Kek) -> int:
        raise RuntimeError("catalog is locked")

    with pytest.raises(RuntimeError):
        ring.rotate(new, failing)
    # Even with the PCRs changed, the key file alone opens both versions.
    tpm_sim.extend(7)
    reopened = KeyRing.open(old, create=False)
    assert (reopened.current.version, reopened.kek(2).version) == (1, 2)
    catalog.assert_readable(reopened)


def test_another_tpm_cannot_unseal(tmp_path: Path, tpm_sim: Swtpm) -> None:
    KeyRing.open(tpm_settings(tmp_path, tpm_sim.tcti))
    with (
        swtpm(tmp_path / "other-state", tmp_path / "other.log") as other,
        pytest.raises(KeyUnavailable, match="sealed by another TPM"),
    ):
        KeyRing.open(tpm_settings(tmp_path, other.tcti))


def test_same_tpm_after_a_restart_unseals(tmp_path: Path) -> None:
    """A reboot resets the PCRs to the values measured at boot; the seed survives."""
    state, log = tmp_path / "tpm-state", tmp_path / "swtpm.log"
    data_key = new_data_key()
    with swtpm(state, log) as first:
        wrapped = KeyRing.open(tpm_settings(tmp_path, first.tcti)).current.wrap(data_key, DOC)
    with swtpm(state, log) as second:
        ring = KeyRing.open(tpm_settings(tmp_path, second.tcti), create=False)
        assert ring.current.unwrap(wrapped, DOC) == data_key


def test_no_tpm_listening_is_unavailable(tmp_path: Path) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    settings = tpm_settings(tmp_path, tcti)
    with pytest.raises(KeyUnavailable, match=f"no TPM at tcti {tcti}: .*Connection refused"):
        KeyRing.open(settings)
    assert not settings.keyring.exists()
