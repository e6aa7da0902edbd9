"""Bundles made from what needs no server (policies, roles, rendered configs, a node image
directory), then verified, tampered with, and made again as a differential bundle.

The mirrors that fill a bundle from servers are tested against real servers in
tests/integration/airgap/."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from typer.testing import CliRunner

from sovereign.bundle.create import CreateOptions, create_bundle
from sovereign.bundle.layout import (
    BLOBS,
    MEDIA_MANIFEST,
    REF_NAME,
    BundleError,
    Descriptor,
    LayoutWriter,
    dumps,
)
from sovereign.bundle.manifest import verify
from sovereign.cli import app
from sovereign.mirror.fetch import Fetcher
from sovereign.profile.loader import load_profile

ROOT = Path(__file__).resolve().parents[3]
AIR_GAPPED = ROOT / "profiles/air-gapped.yaml"


def _profile(tmp_path: Path, bundle: str | None = None) -> Path:
    """The air-gapped example with a bundle: section that fetches nothing: its vLLM model
    comes from a local directory."""
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    (weights / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (weights / "model.safetensors").write_bytes(b"\0" * 4096)
    bundle = bundle or (
        f"bundle:\n  models:\n    sources:\n      qwen2.5-7b-instruct-awq: file:{weights}\n"
    )
    # The CPU fallback model, a small stand-in file instead of the 100 MB GGUF.
    gguf = tmp_path / "fallback.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 1020)
    text = AIR_GAPPED.read_text()
    text = text[: text.index("\nbundle:")] + "\n" + bundle
    text = text.replace("pkg:smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"file:{gguf}")
    # A directory's pin is the sha256 of its `sha256sum` listing, sorted by path.
    listing = subprocess.run(
        ["sha256sum", "config.json", "model.safetensors"],
        cwd=weights, capture_output=True, check=True,
    ).stdout  # fmt: skip
    text = text.replace(
        "6f1c2b2a8d0e4b7f9a3c5d7e1f2a4b6c8d0e2f4a6b8c0d2e4f6a8b0c2d4e6f8a",
        hashlib.sha256(listing).hexdigest(),
    )
    text = text.replace(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hashlib.sha256(gguf.read_bytes()).hexdigest(),
    )
    path = tmp_path / "ward.yaml"
    path.write_text(text.replace("../docs/", f"{ROOT}/docs/"))
    return path


def _image(tmp_path: Path, profile: str = "radiology-ward", disk: bytes = b"disk") -> Path:
    image = tmp_path / "image"
    image.mkdir(exist_ok=True)
    (image / "manifest.json").write_text(json.dumps({"profile": profile, "recipe_hash": "ab" * 32}))
    (image / "disk.raw").write_bytes(disk)
    (image / "vmlinuz").write_bytes(b"kernel")
    return image


def _create(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    out: str = "bundle",
    image: Path | None = None,
    base: Path | None = None,
) -> Path:
    profile_path = _profile(tmp_path)
    options = CreateOptions(tmp_path / out, key, tmp_path / "cache", image, base)
    with Fetcher(console=Console(force_terminal=False)) as fetcher:
        create_bundle(load_profile(profile_path), profile_path, options, fetcher, lambda _: None)
    return tmp_path / out


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_a_bundle_holds_every_artifact_as_an_oci_layout_and_verifies(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    bundle = _create(tmp_path, key, image=_image(tmp_path))
    manifest = json.loads((bundle / "bundle.json").read_text())
    kinds = {a["kind"]: a for a in manifest["artifacts"]}
    assert set(kinds) == {"policy", "roles", "config", "node-image", "model"}
    models = {a["name"]: a for a in manifest["artifacts"] if a["kind"] == "model"}
    assert models["qwen2.5-7b-instruct-awq"]["target"] == "models/qwen2.5-7b-instruct-awq"
    assert {f["path"] for f in models["qwen2.5-7b-instruct-awq"]["files"]} == {
        "config.json",
        "model.safetensors",
    }
    assert models["smollm2-135m-instruct"]["target"] == "models/smollm2-135m-instruct"
    assert {f["path"] for f in kinds["node-image"]["files"]} == {
        "manifest.json",
        "disk.raw",
        "vmlinuz",
    }
    assert kinds["node-image"]["version"] == "ab" * 32
    assert any(f["path"] == "gateway/config.json" for f in kinds["config"]["files"])
    assert any(f["path"].startswith("roles/egress_lockdown/") for f in kinds["roles"]["files"])

    layout = json.loads((bundle / "oci-layout").read_text())
    assert layout == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((bundle / "index.json").read_text())
    types = sorted(m["artifactType"] for m in index["manifests"])
    assert types == sorted(
        f"application/vnd.sovereign.{a['kind']}.v1" for a in manifest["artifacts"]
    )
    for descriptor in index["manifests"]:
        artifact = json.loads((bundle / BLOBS / descriptor["digest"][7:]).read_text())
        assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
        for layer in artifact["layers"]:
            assert (bundle / BLOBS / layer["digest"][7:]).is_file()
    sbom = json.loads((bundle / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["specVersion"] == "1.6"
    assert len(sbom["components"]) == sum(len(a["files"]) for a in manifest["artifacts"])

    result = verify(bundle, key.public_key())
    assert result.ok, result.findings
    assert result.blobs_checked == len(manifest["blobs"])
    assert not list(tmp_path.glob(".bundle.staging-*"))


@pytest.mark.parametrize(
    ("tamper", "file", "problem"),
    [
        ("edit-blob", "blobs/sha256/{disk}", "content is sha256:"),
        ("remove-blob", "blobs/sha256/{disk}", "missing"),
        ("extra-blob", "blobs/sha256/" + "0" * 64, "not listed in bundle.json"),
        ("extra-file", "notes.txt", "not listed in bundle.json"),
        ("edit-sbom", "sbom.cdx.json", "content is sha256:"),
        ("edit-manifest", "bundle.json", "the signature does not match its content"),
        ("remove-signature", "bundle.json.sig", "missing; not a signed bundle"),
    ],
)
def test_every_kind_of_tampering_is_refused_naming_the_file(
    tmp_path: Path, key: Ed25519PrivateKey, tamper: str, file: str, problem: str
) -> None:
    bundle = _create(tmp_path, key, image=_image(tmp_path))
    manifest = json.loads((bundle / "bundle.json").read_text())
    (image,) = (a for a in manifest["artifacts"] if a["kind"] == "node-image")
    disk = next(f["digest"][7:] for f in image["files"] if f["path"] == "disk.raw")
    target = bundle / file.format(disk=disk)
    if tamper == "edit-blob":
        target.write_bytes(b"dusk")
    elif tamper in ("remove-blob", "remove-signature"):
        target.unlink()
    elif tamper in ("extra-blob", "extra-file"):
        target.write_bytes(b"smuggled")
    elif tamper == "edit-sbom":
        target.write_text(target.read_text().replace("radiology-ward", "other-ward"))
    elif tamper == "edit-manifest":
        target.write_text(target.read_text().replace('"radiology-ward"', '"other-ward"'))
    result = verify(bundle, key.public_key())
    assert not result.ok
    assert [str(f) for f in result.findings if f.file == file.format(disk=disk)], result.findings
    assert any(problem in f.problem for f in result.findings), result.findings


def test_a_bundle_signed_by_another_key_is_refused_naming_both_keys(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    bundle = _create(tmp_path, key)
    stranger = Ed25519PrivateKey.generate()
    result = verify(bundle, stranger.public_key())
    (finding,) = result.findings
    assert finding.file == "bundle.json.sig"
    assert "but the trusted key is" in finding.problem


def test_a_differential_bundle_carries_only_new_blobs_and_needs_its_base(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    base = _create(tmp_path, key, "base", image=_image(tmp_path, disk=b"disk v1"))
    update = _create(tmp_path, key, "update", image=_image(tmp_path, disk=b"disk v2"), base=base)
    carried = {p.name for p in (update / BLOBS).iterdir()}
    base_blobs = {p.name for p in (base / BLOBS).iterdir()}
    manifest = json.loads((update / "bundle.json").read_text())
    new_disk = next(
        f["digest"][7:]
        for a in manifest["artifacts"]
        if a["kind"] == "node-image"
        for f in a["files"]
        if f["path"] == "disk.raw"
    )
    assert new_disk in carried
    assert not carried & base_blobs  # nothing the base already has
    assert len(manifest["base"]["blobs"]) > 10  # roles, policies and configs are unchanged

    assert verify(update, key.public_key(), base).ok
    alone = verify(update, key.public_key())
    assert [f.file for f in alone.findings] == ["bundle.json"]
    assert "give that bundle (--base)" in alone.findings[0].problem
    other = _create(tmp_path, key, "other", image=_image(tmp_path, disk=b"disk v3"))
    wrong = verify(update, key.public_key(), other)
    assert "but this bundle was made against" in wrong.findings[0].problem


def test_a_node_image_of_another_profile_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="was built for profile 'edge-box'"):
        _create(tmp_path, key, image=_image(tmp_path, profile="edge-box"))
    assert not (tmp_path / "bundle").exists()


def _invoke(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_makes_a_key_a_bundle_and_verifies_it(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "bundle.pem"
    code, said, _ = _invoke("keys", "create", str(key))
    assert code == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert key.with_suffix(".pub").is_file()
    code, _, complaint = _invoke("keys", "create", str(key))
    assert code == 2
    assert "exists; refusing to replace a key" in complaint

    profile = _profile(tmp_path)
    out = tmp_path / "bundle"
    code, said, complaint = _invoke(
        "bundle", "create", str(profile), "--out", str(out), "--key", str(key)
    )
    assert code == 0, complaint
    assert f"✓ bundle {out}: 5 artifacts" in said  # policy, roles, config, two models
    code, said, _ = _invoke("bundle", "verify", str(out), "--trust", str(key.with_suffix(".pub")))
    assert code == 0
    assert f"✓ bundle {out} verified" in said

    (out / "stray.txt").write_text("x")
    code, _, complaint = _invoke(
        "bundle", "verify", str(out), "--trust", str(key.with_suffix(".pub"))
    )
    assert code == 1
    assert "✗ stray.txt: not listed in bundle.json" in complaint


def test_the_cli_refuses_bad_input_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    key = tmp_path / "bundle.pem"
    _invoke("keys", "create", str(key))
    no_section = tmp_path / "plain.yaml"
    text = _profile(tmp_path).read_text()
    no_section.write_text(text[: text.index("\nbundle:")])
    code, _, complaint = _invoke(
        "bundle", "create", str(no_section), "--out", str(tmp_path / "o"), "--key", str(key)
    )
    assert code == 2
    assert f"{no_section}: the profile has no bundle: section" in complaint
    assert not (tmp_path / "o").exists()

    code, _, complaint = _invoke(
        "bundle", "create", str(_profile(tmp_path)), "--out", str(tmp_path / "o"),
        "--key", str(tmp_path / "absent.pem"),
    )  # fmt: skip
    assert code == 2
    assert "does not exist; make one with `sovereign keys create" in complaint

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    code, _, complaint = _invoke(
        "bundle", "create", str(_profile(tmp_path)), "--out", str(busy), "--key", str(key)
    )
    assert code == 2
    assert "exists and is not an empty directory" in complaint
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]

    code, _, complaint = _invoke("bundle", "verify", str(busy), "--trust", str(key))
    assert code == 2
    assert "is not an Ed25519 public key" in complaint or "not a PEM public key" in complaint


def test_a_bundle_models_origin_must_be_pinned_and_name_a_model(tmp_path: Path) -> None:
    section = (
        "bundle:\n"
        "  models:\n"
        "    sources:\n"
        "      qwen2.5-7b-instruct-awq: hf:Qwen/Qwen2.5-7B-Instruct-AWQ@main\n"
        "      missing-model: file:/srv/models/x\n"
    )
    code, _, complaint = _invoke("profile", "validate", str(_profile(tmp_path, section)))
    assert code == 2
    assert (
        "bundle.models.sources.qwen2.5-7b-instruct-awq: 'hf:Qwen/Qwen2.5-7B-Instruct-AWQ@main'"
        in complaint
    )
    assert "a branch moves" in complaint
    assert "no model named 'missing-model' in models" in complaint


def test_a_missing_file_or_a_wrong_pin_names_the_profile_line(tmp_path: Path) -> None:
    key = tmp_path / "bundle.pem"
    _invoke("keys", "create", str(key))
    section = (
        "bundle:\n"
        "  wheels:\n"
        "    index: http://127.0.0.1:9/simple/\n"
        "    requirements: locks/absent.txt\n"
        "  models:\n"
        "    sources:\n"
        f"      qwen2.5-7b-instruct-awq: file:{tmp_path / 'weights'}\n"
    )
    profile = _profile(tmp_path, section)
    line = profile.read_text().splitlines().index("    requirements: locks/absent.txt") + 1
    code, _, complaint = _invoke(
        "bundle", "create", str(profile), "--out", str(tmp_path / "o"), "--key", str(key)
    )
    assert code == 2
    assert (
        f"{profile}:{line}:19: error: bundle.wheels.requirements: "
        f"{tmp_path / 'locks/absent.txt'} does not exist" in complaint
    )

    profile = _profile(tmp_path)
    (tmp_path / "weights" / "config.json").write_text("{}")  # not the weights it pinned
    code, _, complaint = _invoke(
        "bundle", "create", str(profile), "--out", str(tmp_path / "o"), "--key", str(key)
    )
    assert code == 2
    assert "error: models[0].sha256: pins " in complaint
    assert "the model changed, or the pin is of something else" in complaint
    assert not (tmp_path / "o").exists()


def test_an_empty_lost_and_found_is_tolerated_but_not_one_with_files(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    bundle = _create(tmp_path, key)
    (bundle / "lost+found").mkdir()
    assert verify(bundle, key.public_key()).ok
    (bundle / "lost+found" / "#12").write_bytes(b"recovered")
    found = {str(f) for f in verify(bundle, key.public_key()).findings}
    assert found == {
        "lost+found: unexpected directory",
        "lost+found/#12: not listed in bundle.json",
    }


@pytest.mark.parametrize("stand_in", ["dangling symlink", "symlink to a copy", "fifo"])
def test_a_blob_that_is_not_a_plain_file_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, stand_in: str
) -> None:
    bundle = _create(tmp_path, key, image=_image(tmp_path))
    blob = max((bundle / BLOBS).iterdir(), key=lambda p: p.stat().st_size)
    copy = tmp_path / "elsewhere"
    copy.write_bytes(blob.read_bytes())
    blob.unlink()
    if stand_in == "dangling symlink":
        blob.symlink_to(tmp_path / "nothing")
    elif stand_in == "symlink to a copy":
        blob.symlink_to(copy)  # the right bytes, but outside the bundle
    else:
        os.mkfifo(blob)
    result = verify(bundle, key.public_key())
    assert not result.ok
    problems = {f.problem for f in result.findings if f.file == f"blobs/sha256/{blob.name}"}
    assert "missing" in problems
    assert any(p.endswith("; refused") for p in problems)


def test_a_differential_bundle_over_a_damaged_base_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    base = _create(tmp_path, key, "base", image=_image(tmp_path, disk=b"disk v1"))
    update = _create(tmp_path, key, "update", image=_image(tmp_path, disk=b"disk v2"), base=base)
    left = json.loads((update / "bundle.json").read_text())["base"]["blobs"]
    damaged = base / BLOBS / left[0][7:]
    damaged.write_bytes(damaged.read_bytes() + b"!")
    result = verify(update, key.public_key(), base)
    assert [str(f) for f in result.findings] == [
        f"base {base}: blobs/sha256/{left[0][7:]}: content is "
        f"sha256:{hashlib.sha256(damaged.read_bytes()).hexdigest()}"
    ]


def test_keys_create_never_replaces_a_public_key_already_there(tmp_path: Path) -> None:
    trusted = tmp_path / "vendor.pub"
    trusted.write_text("the vendor's key, kept to verify their bundles\n")
    code, _, complaint = _invoke("keys", "create", str(tmp_path / "vendor.pem"))
    assert code == 2
    assert f"{trusted} exists; refusing to replace a key" in complaint
    assert trusted.read_text() == "the vendor's key, kept to verify their bundles\n"
    assert not (tmp_path / "vendor.pem").exists()


def test_bundle_platforms_and_images_are_checked_when_the_profile_is(tmp_path: Path) -> None:
    section = (
        "bundle:\n"
        "  wheels:\n"
        "    index: https://pypi.org/simple/\n"
        "    requirements: locks/gateway.txt\n"
        "    platforms: [manylinux2014_x86_64]\n"
        "  images: ['registry.example/UPPER:1']\n"
        "  platforms: [amd64]\n"
        "  models:\n"
        "    sources:\n"
        f"      qwen2.5-7b-instruct-awq: file:{tmp_path}\n"
    )
    profile = _profile(tmp_path, section)
    lines = profile.read_text().splitlines()
    code, _, complaint = _invoke("profile", "validate", str(profile))
    assert code == 2
    assert f"{profile}:{lines.index('    platforms: [manylinux2014_x86_64]') + 1}:" in complaint
    assert "bundle.wheels.platforms[0]: platform 'manylinux2014_x86_64'" in complaint
    assert "bundle.images[0]: " in complaint
    assert "bundle.platforms[0]: 'amd64': a platform is os/architecture[/variant]" in complaint


def _gateway_image(tmp_path: Path) -> tuple[Path, str]:
    """A stand-in for `sovereign gateway image` output: a one-layer OCI layout and its
    image.json (the real image is built and run in tests/integration/test_gateway_image.py)."""
    out = tmp_path / "gateway-image"
    writer = LayoutWriter(out)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(b"\0" * 1024)
    config = dumps({"architecture": "amd64", "os": "linux", "config": {"User": "65532:65532"}})
    manifest = dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": writer.add_bytes(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": writer.add_file(layer),
                    "size": 1024,
                }
            ],
        }
    )
    digest = writer.add_bytes(manifest)
    writer.manifests.append(Descriptor(MEDIA_MANIFEST, digest, len(manifest), {REF_NAME: "0.1.0"}))
    writer.write_layout()
    (out / "image.json").write_bytes(
        dumps({"digest": digest, "reference": "sovereign/gateway:0.1.0"})
    )
    return out, digest


def test_a_bundle_carries_the_gateway_image_by_its_digest(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    image, digest = _gateway_image(tmp_path)
    profile_path = _profile(tmp_path)
    options = CreateOptions(tmp_path / "bundle", key, tmp_path / "cache", gateway_image=image)
    with Fetcher(console=Console(force_terminal=False)) as fetcher:
        create_bundle(load_profile(profile_path), profile_path, options, fetcher, lambda _: None)
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    [carried] = [a for a in manifest["artifacts"] if a["kind"] == "oci-image"]
    assert carried["name"] == "sovereign/gateway"
    assert f"sha256:{carried['sha256']}" == carried["manifest"] == digest
    assert carried["ref"] == "localhost/sovereign/gateway:0.1.0"
    assert verify(tmp_path / "bundle", key.public_key()).ok


def test_a_cluster_pinned_to_another_gateway_digest_is_refused_naming_the_line(
    tmp_path: Path,
) -> None:
    image, digest = _gateway_image(tmp_path)
    key = tmp_path / "bundle.pem"
    _invoke("keys", "create", str(key))
    # The datacenter example, with a bundle: section naming where its models come from.
    datacenter = tmp_path / "dc1.yaml"
    datacenter.write_text(
        (ROOT / "profiles" / "datacenter.yaml").read_text().replace("../docs/", f"{ROOT}/docs/")
        + "bundle:\n  models:\n    sources:\n"
        f"      llama-3.1-70b-instruct-fp8: file:{tmp_path}/llama\n"
        f"      qwen2.5-7b-instruct-awq: file:{tmp_path}/qwen\n"
    )
    (tmp_path / "llama").mkdir()
    (tmp_path / "qwen").mkdir()
    code, _, complaint = _invoke(
        "bundle", "create", str(datacenter), "--out", str(tmp_path / "o"), "--key", str(key),
        "--gateway-image", str(image),
    )  # fmt: skip
    lines = datacenter.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("    gateway: sovereign/"))
    assert code == 2, complaint
    assert complaint.startswith(f"{datacenter}:{line}:14: error: cluster.images.gateway: ")
    assert (
        "pins sha256:2d84ede448ca1a195234c42df8e2e99a5a990b4c9f4a5850166a13d303c338ba" in complaint
    )
    assert f"but --gateway-image {image} is {digest}" in complaint
    assert not (tmp_path / "o").exists()
