"""The OCI mirror against a real registry on loopback: Debian's docker-registry (distribution
2.8), seeded by skopeo with a two-platform image index built here. What the mirror saves is
read back by skopeo and pushed into a second, empty registry, whose digests must match."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from rich.console import Console

from sovereign.mirror.fetch import ChecksumMismatch, DownloadsFailed, Fetcher, MirrorError
from sovereign.mirror.oci import mirror_images, parse_reference
from tests.integration.airgap.registry import (
    LICENCE,
    Image,
    Registry,
    build_index,
    digest_of,
    htpasswd,
    registry,
    skopeo,
    token_server,
)
from tests.integration.airgap.servers import need

pytestmark = pytest.mark.timeout(120)

REPOSITORY = "team/app"
TAG = "1.0"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class Upstream:
    registry: Registry
    storage: Path
    images: dict[str, Image]  # by platform
    index_digest: str
    legacy_digest: str  # team/legacy:1.0, a Docker schema 2 image

    def ref(self, suffix: str = f":{TAG}", repository: str = REPOSITORY) -> str:
        return f"{self.registry.host}/{repository}{suffix}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    need("docker-registry", "skopeo")
    work = tmp_path_factory.mktemp("oci-upstream")
    images = build_index(work / "layout", TAG)
    storage = work / "storage"
    with registry(storage, work / "registry.log") as server:
        server.push(work / "layout", TAG, f"{REPOSITORY}:{TAG}")
        # The same amd64 image, as a registry holds what `docker push` sent.
        skopeo(
            "copy", "--dest-tls-verify=false", "--format", "v2s2", "--override-arch", "amd64",
            f"oci:{work / 'layout'}:{TAG}", f"docker://{server.host}/team/legacy:{TAG}",
        )  # fmt: skip
        yield Upstream(
            server,
            storage,
            {image.platform: image for image in images},
            digest_of(_raw(server, f"{REPOSITORY}:{TAG}")),
            digest_of(_raw(server, f"team/legacy:{TAG}")),
        )


def _raw(server: Registry, name: str) -> bytes:
    return skopeo(
        "inspect", "--raw", "--tls-verify=false", f"docker://{server.host}/{name}"
    ).encode()


_OPEN: list[Fetcher] = []


def _fetcher() -> Fetcher:
    fetcher = Fetcher(backoff=0.1, console=Console(record=True, width=200, force_terminal=False))
    _OPEN.append(fetcher)
    return fetcher


@pytest.fixture(autouse=True)
def _close_fetchers() -> Iterator[None]:
    """Their keep-alive connections are closed here, not by the collector in a later test."""
    yield
    while _OPEN:
        _OPEN.pop().http.close()


def _summary(fetcher: Fetcher) -> str:
    return str(fetcher.console.export_text())


def _blobs(out: Path) -> set[str]:
    return {f"sha256:{path.name}" for path in (out / "blobs" / "sha256").iterdir()}


def _index(out: Path) -> list[dict[str, Any]]:
    manifests: list[dict[str, Any]] = json.loads((out / "index.json").read_text())["manifests"]
    return manifests


def _entry(out: Path, ref_name: str) -> dict[str, Any]:
    entries = [e for e in _index(out) if e["annotations"][REF_NAME] == ref_name]
    assert len(entries) == 1, _index(out)
    return entries[0]


def test_a_tag_of_an_index_is_mirrored_for_one_platform_and_round_trips_through_skopeo(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = tmp_path / "mirror"
    ref = upstream.ref()
    amd64, arm64 = upstream.images["linux/amd64"], upstream.images["linux/arm64"]

    [artifact] = mirror_images([ref], out, _fetcher(), ["linux/amd64"])

    hexdigest = amd64.digest.removeprefix("sha256:")
    assert artifact.kind == "oci-image"
    assert (artifact.name, artifact.version, artifact.source) == (REPOSITORY, TAG, ref)
    assert (artifact.sha256, artifact.path) == (hexdigest, f"blobs/sha256/{hexdigest}")
    assert artifact.size == amd64.manifest["size"] == (out / artifact.path).stat().st_size
    assert artifact.licence == LICENCE
    assert artifact.purl == (
        f"pkg:oci/app@sha256%3A{hexdigest}?repository_url={upstream.registry.host}/team/app&tag=1.0"
    )
    # The amd64 image and nothing of arm64's own (the base layer is shared).
    assert _blobs(out) == {amd64.digest, *amd64.blobs}
    assert not (arm64.blobs - amd64.blobs) & _blobs(out)
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    entry = _entry(out, ref)
    assert entry["digest"] == amd64.digest
    assert entry["annotations"]["sovereign.mirror.source-digest"] == upstream.index_digest

    inspected = json.loads(skopeo("inspect", f"oci:{out}:{ref}"))
    assert (inspected["Digest"], inspected["Architecture"]) == (amd64.digest, "amd64")
    assert inspected["Labels"]["org.opencontainers.image.licenses"] == LICENCE
    with registry(tmp_path / "second", tmp_path / "second.log") as second:
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"oci:{out}:{ref}",
            f"docker://{second.host}/team/app:1.0",
        )
        assert digest_of(_raw(second, "team/app:1.0")) == amd64.digest


def test_by_digest_and_by_tag_at_digest_merge_into_one_layout_and_reuse_its_blobs(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = tmp_path / "mirror"
    arm64 = upstream.images["linux/arm64"]
    by_digest = upstream.ref(f"@{upstream.index_digest}")
    pinned = upstream.ref(f":{TAG}@{upstream.index_digest}")

    first = mirror_images([by_digest], out, _fetcher(), ["linux/arm64"])
    again = _fetcher()
    second = mirror_images([pinned, upstream.ref()], out, again, ["linux/arm64"])

    # `name:tag@digest` and `name:tag` share a ref name: both checked, one entry.
    assert [a.sha256 for a in first + second] == [arm64.digest.removeprefix("sha256:")] * 2
    assert second[0].source == upstream.ref()
    assert first[0].version == upstream.index_digest
    hexdigest = arm64.digest.removeprefix("sha256:")
    repository_url = f"{upstream.registry.host}/{REPOSITORY}"
    assert first[0].purl == f"pkg:oci/app@sha256%3A{hexdigest}?repository_url={repository_url}"
    summary = _summary(again)
    assert "oci configs: 0 fetched" in summary
    assert "oci layers: 0 fetched" in summary
    names = sorted(e["annotations"][REF_NAME] for e in _index(out))
    assert names == sorted([by_digest, upstream.ref()])
    inspected = json.loads(skopeo("inspect", f"oci:{out}:{by_digest}"))
    assert (inspected["Digest"], inspected["Architecture"]) == (arm64.digest, "arm64")

    moved = "sha256:" + "0" * 64
    with pytest.raises(
        MirrorError, match=rf"{re.escape(upstream.ref(f':{TAG}@{moved}'))}: manifest .* not found"
    ):
        mirror_images([upstream.ref(f":{TAG}@{moved}")], out, _fetcher())
    # The tag exists but now names another manifest than the one pinned.
    amd64 = upstream.images["linux/amd64"].digest
    with pytest.raises(MirrorError, match=f"tag '1.0' is now {upstream.index_digest}, not {amd64}"):
        mirror_images([upstream.ref(f":{TAG}@{amd64}")], out, _fetcher())


def test_several_platforms_are_kept_as_an_index_of_just_those(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = tmp_path / "mirror"
    ref = upstream.ref()
    artifacts = mirror_images([ref], out, _fetcher(), ["linux/arm64", "linux/amd64"])

    wanted = [upstream.images[p].digest for p in ("linux/arm64", "linux/amd64")]
    assert [f"sha256:{a.sha256}" for a in artifacts] == wanted
    entry = _entry(out, ref)
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    with registry(tmp_path / "second", tmp_path / "second.log") as second:
        skopeo(
            "copy",
            "--all",
            "--dest-tls-verify=false",
            f"oci:{out}:{ref}",
            f"docker://{second.host}/team/app:1.0",
        )
        pushed = _raw(second, "team/app:1.0")
    assert digest_of(pushed) == entry["digest"]
    assert [m["digest"] for m in json.loads(pushed)["manifests"]] == wanted

    with pytest.raises(MirrorError) as caught:
        mirror_images([ref], out, _fetcher(), ["linux/s390x"])
    assert (
        str(caught.value)
        == f"{ref}: no image for linux/s390x; the index has linux/amd64, linux/arm64"
    )


def test_a_docker_schema_2_image_is_stored_as_oci_with_its_config_and_layers_unchanged(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = tmp_path / "mirror"
    ref = upstream.ref(repository="team/legacy")
    amd64 = upstream.images["linux/amd64"]

    [artifact] = mirror_images([ref], out, _fetcher(), ["linux/amd64"])

    manifest = json.loads((out / artifact.path).read_bytes())
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [d["digest"] for d in [manifest["config"], *manifest["layers"]]] == [
        amd64.config,
        *amd64.layers,
    ]
    entry = _entry(out, ref)
    assert entry["annotations"]["sovereign.mirror.source-digest"] == upstream.legacy_digest
    inspected = json.loads(skopeo("inspect", f"oci:{out}:{ref}"))
    assert (inspected["Digest"], inspected["Architecture"]) == (
        f"sha256:{artifact.sha256}",
        "amd64",
    )

    # A single-platform image is still checked against the node's platform.
    with pytest.raises(
        MirrorError,
        match=re.escape(f"{ref}: a single-platform image for linux/amd64, not linux/arm64"),
    ):
        mirror_images([ref], tmp_path / "other", _fetcher(), ["linux/arm64"])


def test_a_token_auth_registry_is_pulled_through_its_token_server(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = tmp_path / "mirror"
    amd64 = upstream.images["linux/amd64"]
    with token_server("test-registry", "mirror", "s3cret") as tokens:
        auth = tokens.auth_config(tmp_path / "issuer.pem")
        with registry(upstream.storage, tmp_path / "token.log", auth, read_only=True) as guarded:
            ref = f"{guarded.host}/{REPOSITORY}:{TAG}"
            plain = requests.get(
                f"http://{guarded.host}/v2/{REPOSITORY}/manifests/{TAG}", timeout=10
            )
            assert plain.status_code == 401
            assert f'realm="{tokens.realm}"' in plain.headers["WWW-Authenticate"]

            credentials = {guarded.host: ("mirror", "s3cret")}
            [artifact] = mirror_images([ref], out, _fetcher(), credentials=credentials)
            assert f"sha256:{artifact.sha256}" == amd64.digest
            assert _blobs(out) == {amd64.digest, *amd64.blobs}
            # One token for the repository, reused for its manifests and every blob.
            assert tokens.requests == [
                {"service": ["test-registry"], "scope": [f"repository:{REPOSITORY}:pull"]}
            ]

            refusals = [("user 'mirror'", {guarded.host: ("mirror", "wrong")}), ("anonymous", None)]
            for who, wrong in refusals:
                with pytest.raises(MirrorError) as caught:
                    mirror_images([ref], tmp_path / "denied", _fetcher(), credentials=wrong)
                refused = f"{guarded.host}: token server {tokens.realm} refused {who}"
                assert str(caught.value).startswith(refused)
    assert not (tmp_path / "denied").exists()


def test_a_basic_auth_registry_is_given_its_credentials(tmp_path: Path, upstream: Upstream) -> None:
    amd64 = upstream.images["linux/amd64"]
    users = htpasswd(tmp_path / "htpasswd", "mirror", "s3cret")
    auth = {"htpasswd": {"realm": "test-registry", "path": str(users)}}
    with registry(upstream.storage, tmp_path / "basic.log", auth, read_only=True) as guarded:
        ref = f"{guarded.host}/{REPOSITORY}:{TAG}"
        credentials = {guarded.host: ("mirror", "s3cret")}
        [artifact] = mirror_images([ref], tmp_path / "mirror", _fetcher(), credentials=credentials)
        assert f"sha256:{artifact.sha256}" == amd64.digest

        wrong = {guarded.host: ("mirror", "wrong")}
        with pytest.raises(MirrorError) as caught:
            mirror_images([ref], tmp_path / "denied", _fetcher(), credentials=wrong)
    assert str(caught.value) == (
        f"{ref}: {guarded.host} refused access, HTTP 401 (UNAUTHORIZED); "
        f"check the credentials for {guarded.host}"
    )


def test_a_tampered_blob_is_refused_and_leaves_nothing_in_the_layout(
    tmp_path: Path, upstream: Upstream
) -> None:
    storage = tmp_path / "storage"
    shutil.copytree(upstream.storage, storage)
    amd64 = upstream.images["linux/amd64"]
    own_layer = amd64.layers[-1]
    out = tmp_path / "mirror"
    with registry(storage, tmp_path / "registry.log") as server:
        data = server.blob_data(own_layer)
        # Same length, other bytes: only the digest can tell.
        data.write_bytes(hashlib.shake_256(b"tampered").digest(data.stat().st_size))
        with pytest.raises(DownloadsFailed) as caught:
            mirror_images([f"{server.host}/{REPOSITORY}:{TAG}"], out, _fetcher())

    [(url, error)] = caught.value.failures.items()
    assert url.endswith(f"/v2/{REPOSITORY}/blobs/{own_layer}")
    assert isinstance(error, ChecksumMismatch)
    assert error.expected == own_layer.removeprefix("sha256:")
    assert own_layer in str(caught.value)
    assert not [p for p in out.rglob("*") if own_layer.removeprefix("sha256:") in p.name]
    assert not list(out.rglob("*.part"))
    assert not (out / "index.json").exists()


def test_an_unknown_tag_is_named(tmp_path: Path, upstream: Upstream) -> None:
    ref = upstream.ref(":9.9-missing")
    with pytest.raises(MirrorError) as caught:
        mirror_images([ref], tmp_path / "mirror", _fetcher())
    assert str(caught.value) == (
        f"{ref}: tag '9.9-missing' not found in {upstream.registry.host}/{REPOSITORY} "
        "(MANIFEST_UNKNOWN)"
    )


@pytest.mark.parametrize(
    ("text", "normalized", "ref_name"),
    [
        ("debian", "docker.io/library/debian:latest", "docker.io/library/debian:latest"),
        ("bitnami/redis:7.2", "docker.io/bitnami/redis:7.2", "docker.io/bitnami/redis:7.2"),
        ("localhost/app:1", "localhost/app:1", "localhost/app:1"),
        ("ghcr.io/org/app", "ghcr.io/org/app:latest", "ghcr.io/org/app:latest"),
        (
            f"app@sha256:{'a' * 64}",
            f"docker.io/library/app@sha256:{'a' * 64}",
            f"docker.io/library/app@sha256:{'a' * 64}",
        ),
        (f"h:5000/x/y:2@sha256:{'b' * 64}", f"h:5000/x/y:2@sha256:{'b' * 64}", "h:5000/x/y:2"),
    ],
)
def test_references_are_normalized_as_docker_does(
    text: str, normalized: str, ref_name: str
) -> None:
    ref = parse_reference(text)
    assert (str(ref), ref.ref_name) == (normalized, ref_name)


@pytest.mark.parametrize("text", ["Team/App:1", "app:-bad", "app@md5:abc", "app@sha256:short"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(MirrorError, match=re.escape(text)):
        parse_reference(text)
