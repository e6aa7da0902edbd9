"""`bundle import`'s parts that need no server: the PEP 503 pages, the apt indexes and
Release, the registry names, the node's configs; and imports of bundles made from what
needs no server (models, policies, roles, configs, a node image), which are idempotent,
need their base, stop naming a blob changed after verification, and refuse bad input.

The round trip through real servers is tests/integration/airgap/test_roundtrip.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from debian import deb822
from rich.console import Console
from typer.testing import CliRunner

from sovereign.bundle import importer
from sovereign.bundle.create import CreateOptions, create_bundle
from sovereign.bundle.importer import (
    BundleFile,
    DebEntry,
    ImportFailed,
    ImportOptions,
    ImportRefused,
    Listed,
    NodeProfile,
    apt_sources,
    archive_signer,
    check_mirrors,
    deb_location,
    import_bundle,
    local_registry,
    pip_conf,
    plan_pushes,
    platform_index,
    registries_conf,
    release_file,
    safe_path,
    simple_index,
    suite_indexes,
    valid_registry,
)
from sovereign.bundle.layout import BLOBS, BundleError
from sovereign.bundle.manifest import Verification
from sovereign.cli import app
from sovereign.mirror.fetch import Fetcher
from sovereign.profile.loader import load_profile
from tests.unit.bundle.test_bundle import _image, _profile

CONTROL = "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nDescription: x\n"


def _deb(
    name: str, arch: str = "amd64", suite: str = "bookworm", component: str = "main"
) -> DebEntry:
    control = CONTROL.format(name=name, version="1.0", arch=arch)
    path = f"pool/{component}/{name[0]}/{name}/{name}_1.0_{arch}.deb"
    return DebEntry(path, suite, component, arch, control, "ab" * 32, 1234)


def _image_artifact(source: str, manifest: str = "sha256:" + "1" * 64) -> Listed:
    return Listed("oci-image", "x", "1", manifest, (), source=source, ref=source)


def test_the_simple_index_links_every_wheel_by_sha256_under_its_normalized_project() -> None:
    pages = simple_index(
        {
            "Demo_Pkg-1.0-py3-none-any.whl": {"project": "demo-pkg", "sha256": "aa" * 32},
            "demo_pkg-1.1-py3-none-any.whl": {"project": "demo-pkg", "sha256": "bb" * 32},
            "helper-2.0-py3-none-any.whl": {"project": "helper", "sha256": "cc" * 32},
        }
    )
    assert set(pages) == {
        "simple/index.html",
        "simple/demo-pkg/index.html",
        "simple/helper/index.html",
    }
    root = pages["simple/index.html"].decode()
    assert '<a href="demo-pkg/">demo-pkg</a>' in root
    assert '<a href="helper/">helper</a>' in root
    demo = pages["simple/demo-pkg/index.html"].decode()
    assert f'href="../../files/Demo_Pkg-1.0-py3-none-any.whl#sha256={"aa" * 32}"' in demo
    assert f'href="../../files/demo_pkg-1.1-py3-none-any.whl#sha256={"bb" * 32}"' in demo
    assert "helper" not in demo


def test_each_suite_gets_indexes_per_component_and_architecture_that_its_release_lists() -> None:
    entries = [
        _deb("app"),
        _deb("data", arch="all"),
        _deb("extra", component="contrib"),
        _deb("lib", suite="bookworm-updates"),
    ]
    suites = {s.name: s for s in suite_indexes(entries, ["amd64"])}
    assert set(suites) == {"bookworm", "bookworm-updates"}
    bookworm = suites["bookworm"]
    assert bookworm.components == ("contrib", "main")
    assert bookworm.architectures == ("amd64",)
    main = deb822.Packages.iter_paragraphs(
        bookworm.files["main/binary-amd64/Packages"], use_apt_pkg=False
    )
    listed = {p["Package"]: p for p in main}
    # arch: all is in each binary-<arch> index; the other component's package is not.
    assert set(listed) == {"app", "data"}
    assert listed["app"]["Filename"] == "pool/main/a/app/app_1.0_amd64.deb"
    assert listed["app"]["SHA256"] == "ab" * 32
    assert listed["app"]["Size"] == "1234"
    plain = bookworm.files["main/binary-amd64/Packages"]
    assert gzip.decompress(bookworm.files["main/binary-amd64/Packages.gz"]) == plain

    release = deb822.Release(release_file(bookworm, "ward", importer.datetime.now(importer.UTC)))
    assert (release["Suite"], release["Codename"]) == ("bookworm", "bookworm")
    assert release["Components"] == "contrib main"
    assert release["No-Support-for-Architecture-all"] == "Packages"
    assert "Valid-Until" not in release
    hashes = {e["name"]: (e["sha256"], int(e["size"])) for e in release["SHA256"]}
    assert hashes == {
        name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in bookworm.files.items()
    }


def test_a_debs_suite_is_its_purls_distro_and_its_component_its_pool_directory() -> None:
    def deb(path: str, purl: str | None) -> Listed:
        return Listed("deb", "x", "1", "sha256:" + "0" * 64, (BundleFile(path, "", 1),), purl)

    purl = "pkg:deb/debian/app@1.0?arch=amd64&distro=bookworm-security"
    assert deb_location(deb("pool/non-free/a/app.deb", purl), "ward") == (
        "bookworm-security",
        "non-free",
    )
    assert deb_location(deb("app.deb", None), "ward") == ("ward", "main")
    with pytest.raises(BundleError, match=r"'\.\./\.\./etc' cannot name a suite"):
        deb_location(deb("pool/main/a/app.deb", "pkg:deb/debian/app@1?distro=../../etc"), "w")


def test_images_keep_their_repository_path_without_the_source_host() -> None:
    registry = local_registry("127.0.0.1:5001", "https://mirror.ward.internal/")
    assert registry.url == "http://127.0.0.1:5001"  # loopback: plain HTTP
    assert local_registry("mirror:5000", "https://m/").url == "https://mirror:5000"
    assert local_registry(None, "http://mirror:5000/oci/").url == "http://mirror:5000"
    digest = "sha256:" + "2" * 64
    pushes = plan_pushes(
        [
            _image_artifact("127.0.0.1:5000/team/app:1.0"),
            _image_artifact(f"docker.io/library/debian@{digest}", digest),
            # Two platforms of one ref, bundled as separate images.
            _image_artifact("ghcr.io/org/tool:2"),
            _image_artifact("ghcr.io/org/tool:2", "sha256:" + "3" * 64),
        ],
        registry,
    )
    assert [(p.repository, p.reference, len(p.images)) for p in pushes] == [
        ("team/app", "1.0", 1),
        ("library/debian", digest, 1),
        ("org/tool", "2", 2),
    ]
    prefixed = local_registry(None, "https://mirror.ward.internal/oci/")
    assert plan_pushes([_image_artifact("quay.io/a/b:1")], prefixed)[0].repository == "oci/a/b"
    with pytest.raises(BundleError, match=r"all become team/app:1\.0 on the local registry"):
        plan_pushes(
            [
                _image_artifact("ghcr.io/team/app:1.0"),
                _image_artifact("quay.io/team/app:1.0", "sha256:" + "4" * 64),
            ],
            registry,
        )


def test_a_platform_index_lists_each_image_with_its_platform() -> None:
    manifest = "application/vnd.oci.image.manifest.v1+json"
    amd64 = {"os": "linux", "architecture": "amd64"}
    arm64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    index = json.loads(platform_index([(b"amd", manifest, amd64), (b"arm", manifest, arm64)]))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"] for m in index["manifests"]] == [amd64, arm64]
    assert index["manifests"][0]["digest"] == f"sha256:{hashlib.sha256(b'amd').hexdigest()}"


def test_the_node_configs_name_the_profiles_mirrors_and_nothing_else() -> None:
    conf = registries_conf("ward", ["docker.io", "127.0.0.1:5000"], "https://mirror.ward/")
    text = conf.decode()
    assert text.count("[[registry]]") == 2
    assert 'prefix = "docker.io"\nlocation = "mirror.ward"\ninsecure = false\n' in text
    # `location` rewrites: no [[registry.mirror]] that could fall back to the source.
    assert "registry.mirror" not in text
    assert "blocked" not in text.replace("`blocked`", "")
    plain = registries_conf("ward", ["docker.io"], "http://10.0.0.1:5000/oci/").decode()
    assert 'location = "10.0.0.1:5000/oci"\ninsecure = true' in plain

    assert (
        pip_conf("ward", "https://m/pypi/simple/")
        .decode()
        .endswith("[global]\nindex-url = https://m/pypi/simple/\n")
    )
    suites = suite_indexes(
        [_deb("a"), _deb("b", suite="updates"), _deb("c", suite="x", component="contrib")],
        ["amd64"],
    )
    sources = apt_sources("ward", "https://m/debian/", suites).decode()
    stanzas = list(deb822.Deb822.iter_paragraphs(sources.split("\n", 1)[1]))
    assert [(s["Suites"], s["Components"]) for s in stanzas] == [
        ("x", "contrib"),
        ("bookworm updates", "main"),
    ]
    assert {s["Signed-By"] for s in stanzas} == {"/etc/apt/keyrings/sovereign-archive.gpg"}


def test_paths_and_hosts_from_the_bundle_or_the_command_line_are_checked() -> None:
    for bad in ("/etc/passwd", "../x", "a/../../b", ""):
        with pytest.raises(BundleError, match="unsafe path"):
            safe_path(bad, "here")
    assert str(safe_path("models/a/b.bin", "here")) == "models/a/b.bin"
    assert valid_registry("127.0.0.1:5000")
    assert valid_registry("mirror.ward.internal")
    assert not valid_registry("http://mirror:5000")
    assert not valid_registry("mirror:5000/path")
    profile = NodeProfile("ward", {"pypi": "https://m/simple/"}, ("amd64",))
    wheel = Listed("wheel", "x", "1", "sha256:" + "0" * 64, ())
    deb = Listed("deb", "x", "1", "sha256:" + "0" * 64, ())
    check_mirrors(profile, [wheel])
    with pytest.raises(BundleError, match=r"mirrors: has no `kind: debian` entry.*2 deb"):
        check_mirrors(profile, [wheel, deb, deb])


def test_the_apt_key_is_made_once_kept_private_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "ward" / "archive-key.asc"
    uid = "Test archive <archive@sovereign.invalid>"
    with archive_signer(key_file, uid) as signer:
        first = signer.fingerprint
        public = signer.public_key()
        signed = signer.clearsign(b"Suite: bookworm\n")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert oct(key_file.parent.stat().st_mode & 0o777) == "0o700"
    assert b"BEGIN PGP SIGNED MESSAGE" in signed
    with archive_signer(key_file, uid) as again:
        assert again.fingerprint == first
        assert again.public_key() == public
    with (
        pytest.raises(BundleError, match="no such file"),
        archive_signer(tmp_path / "absent", None),
    ):
        pass
    other = tmp_path / "other.asc"
    with archive_signer(other, "Other <other@sovereign.invalid>"):
        pass
    two = tmp_path / "two.asc"
    two.write_bytes(key_file.read_bytes() + other.read_bytes())
    with pytest.raises(BundleError, match="holds 2 secret keys"), archive_signer(two, None):
        pass
    locked = _passphrase_key(tmp_path / "locked")
    refused = pytest.raises(BundleError, match=r"cannot sign.*without a passphrase")
    with refused, archive_signer(locked, None):
        pass


def _passphrase_key(home: Path) -> Path:
    """An exported secret key protected by a passphrase."""
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--quiet", "--homedir", str(home), "--pinentry-mode", "loopback"]
    try:
        subprocess.run(
            [*gpg, "--passphrase", "secret", "--quick-gen-key", "L <l@sovereign.invalid>",
             "ed25519", "sign", "never"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        exported = subprocess.run(
            [*gpg, "--passphrase", "secret", "--armor", "--export-secret-keys"],
            check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False, timeout=60
        )
    path = home.with_suffix(".asc")
    path.write_bytes(exported)
    return path


# ---- imports of bundles made without servers -----------------------------------------------


def _bundle(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    out: str,
    disk: bytes = b"disk",
    base: Path | None = None,
    edit: tuple[str, str] | None = None,
) -> Path:
    profile_path = _profile(tmp_path)
    if edit is not None:
        profile_path.write_text(profile_path.read_text().replace(*edit))
    options = CreateOptions(
        tmp_path / out, key, tmp_path / "cache", _image(tmp_path, disk=disk), base
    )
    with Fetcher(console=Console(force_terminal=False)) as fetcher:
        create_bundle(load_profile(profile_path), profile_path, options, fetcher, lambda _: None)
    return tmp_path / out


def _options(
    bundle: Path, key: Ed25519PrivateKey, into: Path, base: Path | None = None
) -> ImportOptions:
    return ImportOptions(bundle, key.public_key(), into, into.parent / "apt-keys", base)


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and ".sovereign" not in p.parts
    }


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_an_import_writes_each_kind_in_place_and_a_second_import_writes_nothing(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    bundle = _bundle(tmp_path, key, "bundle")
    into = tmp_path / "mirror"
    first = import_bundle(_options(bundle, key, into), lambda _: None)
    assert first.changed
    assert not first.seen_before
    assert {k.kind for k in first.kinds} == {"model", "policy", "roles", "config", "node-image"}
    model = into / "models/models/qwen2.5-7b-instruct-awq"
    sums = (model / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == ["config.json", "model.safetensors"]
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((model / name).read_bytes()).hexdigest() == digest
    assert (into / "node-image/disk.raw").read_bytes() == b"disk"
    assert (into / "config/profile.yaml").is_file()
    assert (into / "ansible/playbooks").is_dir()
    # No wheels, debs or images: no configs for their mirrors.
    assert not (into / "node-config").exists()
    before = _files(into)

    again = import_bundle(_options(bundle, key, into), lambda _: None)
    assert again.seen_before
    assert not again.changed
    assert all(k.written == 0 for k in again.kinds)
    assert _files(into) == before  # not one byte, not one mtime

    # A file gone from a tree is noticed, and the tree put back whole.
    (into / "policies/README.md").unlink()
    repaired = import_bundle(_options(bundle, key, into), lambda _: None)
    assert [k.kind for k in repaired.kinds if k.written] == ["policy"]
    assert (into / "policies/README.md").is_file()


def test_a_differential_bundle_needs_its_base_and_then_imports(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    base = _bundle(tmp_path, key, "base", disk=b"disk v1")
    update = _bundle(tmp_path, key, "update", disk=b"disk v2", base=base)
    into = tmp_path / "mirror"
    with pytest.raises(ImportRefused) as refused:
        import_bundle(_options(update, key, into), lambda _: None)
    assert [f.file for f in refused.value.findings] == ["bundle.json"]
    assert "give that bundle (--base)" in refused.value.findings[0].problem
    assert not into.exists()

    imported = import_bundle(_options(update, key, into, base), lambda _: None)
    assert imported.changed
    assert (into / "node-image/disk.raw").read_bytes() == b"disk v2"
    # The blobs the update left to its base came from there.
    assert (into / "models/models/qwen2.5-7b-instruct-awq/model.safetensors").is_file()


def test_a_blob_changed_after_verification_stops_the_import_naming_it_and_keeps_the_rest(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    into = tmp_path / "mirror"
    v1 = _bundle(tmp_path, key, "v1", disk=b"disk v1")
    import_bundle(_options(v1, key, into), lambda _: None)
    v2 = _bundle(tmp_path, key, "v2", disk=b"disk v2")
    manifest = json.loads((v2 / "bundle.json").read_text())
    (image,) = (a for a in manifest["artifacts"] if a["kind"] == "node-image")
    disk = next(f["digest"][7:] for f in image["files"] if f["path"] == "disk.raw")
    real_verify = importer.verify

    def verify_then_swap(
        root: Path, trusted: Ed25519PublicKey, base: Path | None = None
    ) -> Verification:
        result = real_verify(root, trusted, base)
        (v2 / BLOBS / disk).write_bytes(b"dusk v2")
        return result

    monkeypatch.setattr(importer, "verify", verify_then_swap)
    with pytest.raises(ImportFailed) as failed:
        import_bundle(_options(v2, key, into), lambda _: None)
    message = str(failed.value)
    assert message.startswith("node-image: ")
    assert f"{BLOBS}/{disk}: content is sha256:" in message
    assert (into / "node-image/disk.raw").read_bytes() == b"disk v1"  # the old tree stands
    assert not list((into / ".sovereign/staging").iterdir())
    assert not list((into / "node-image").glob(".*.tmp"))


def test_a_profile_without_the_mirror_for_a_kind_it_carries_is_refused_naming_the_field(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    edit = ("  - kind: models\n    url: https://mirror.ward.internal/models/\n", "")
    bundle = _bundle(tmp_path, key, "bundle", edit=edit)
    into = tmp_path / "mirror"
    key_file = tmp_path / "bundle.pub"
    key_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    code, _, complaint = _invoke(
        "bundle", "import", str(bundle), "--trust", str(key_file), "--into", str(into)
    )
    assert code == 2
    assert "profile radiology-ward: mirrors: has no `kind: models` entry" in complaint
    assert "2 model artifact(s)" in complaint
    assert not into.exists()


def _invoke(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_refuses_bad_input_with_exit_2_naming_it(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert _invoke("keys", "create", str(key))[0] == 0
    pub = str(key.with_suffix(".pub"))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    into = str(tmp_path / "into")
    cases = [
        (["bundle", "import", str(tmp_path / "nope"), "--trust", pub, "--into", into],
         "is not a directory"),
        (["bundle", "import", str(bundle), "--trust", str(a_file), "--into", into], "--trust:"),
        (["bundle", "import", str(bundle), "--trust", pub, "--into", str(a_file)],
         f"--into {a_file} exists and is not a directory"),
        (["bundle", "import", str(bundle), "--trust", pub, "--into", into,
          "--apt-key", str(tmp_path / "absent.asc")], "--apt-key"),
        (["bundle", "import", str(bundle), "--trust", pub, "--into", into,
          "--registry", "http://x:1"], "--registry 'http://x:1': expected HOST:PORT"),
        (["bundle", "import", str(bundle), "--trust", pub, "--into", into,
          "--base", str(a_file)], f"--base {a_file} is not a directory"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, complaint = _invoke(*argv)
        assert code == 2, argv
        assert message in complaint, (argv, complaint)
    # An empty directory is no bundle: refused, as verification fails, with exit 1.
    code, _, complaint = _invoke("bundle", "import", str(bundle), "--trust", pub, "--into", into)
    assert code == 1
    assert "✗ bundle.json: missing; not a signed bundle" in complaint
    assert "nothing was imported" in complaint
    assert not Path(into).exists()
