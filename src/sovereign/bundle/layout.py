"""A bundle on disk: an OCI image layout whose manifests are typed artifacts.

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              one descriptor per artifact manifest and per container image
    blobs/sha256/<hex>      every file, layer, config and manifest, named by its digest
    sbom.cdx.json           CycloneDX JSON: every artifact with its source and licence
    bundle.json             what the bundle holds: artifacts, every blob with its size,
                            the digests of the three files above; the signature covers it
    bundle.json.sig         Ed25519 over the exact bytes of bundle.json

A wheel, a deb, a model or a node image is an OCI 1.1 artifact manifest (`artifactType`
`application/vnd.sovereign.<kind>.v1`, the empty config, its files as layers titled with
their paths) annotated with its source, licence and version. A container image keeps its
own manifest, so `skopeo copy oci:<bundle>:<ref>` reads it straight from the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign.mirror.artifact import Artifact

FORMAT = "sovereign-bundle/1"
MANIFEST_FILE = "bundle.json"
SIGNATURE_FILE = "bundle.json.sig"
SBOM_FILE = "sbom.cdx.json"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS = Path("blobs") / "sha256"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"
CHUNK = 1 << 20


def artifact_type(kind: str) -> str:
    return f"application/vnd.sovereign.{kind}.v1"


def layer_type(kind: str) -> str:
    return f"application/vnd.sovereign.{kind}.file.v1"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # sha256:<hex>
    size: int
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        if self.annotations:
            data["annotations"] = dict(sorted(self.annotations.items()))
        return data


def blob_path(root: Path, digest: str) -> Path:
    return root / BLOBS / digest.removeprefix("sha256:")


def dumps(data: Any) -> bytes:
    """The one JSON form every bundle file is written in, so digests are reproducible."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


class LayoutWriter:
    """Fills a staging directory; blobs are hashed as they are copied in, so the digests
    in the bundle are of the bytes it holds, whatever a mirror said about its files.

    `omit` names blobs a differential bundle leaves to its base: they are listed, not
    copied.
    """

    def __init__(self, root: Path, omit: Iterable[str] = ()) -> None:
        self.root = root
        self.omit = frozenset(omit)
        self.sizes: dict[str, int] = {}
        self.omitted: set[str] = set()
        self.manifests: list[Descriptor] = []
        (root / BLOBS).mkdir(parents=True, exist_ok=True)

    def add_file(self, path: Path, expected_sha256: str | None = None) -> str:
        """Copy `path` in as a blob; its digest, checked against `expected_sha256`."""
        digest = hashlib.sha256()
        temporary = self.root / BLOBS / f".incoming-{os.getpid()}"
        with path.open("rb") as source, temporary.open("wb") as sink:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                sink.write(chunk)
        name = f"sha256:{digest.hexdigest()}"
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            temporary.unlink()
            raise BundleError(
                f"{path}: sha256 is {digest.hexdigest()}, but the mirror recorded "
                f"{expected_sha256}; it changed after it was fetched"
            )
        self._keep(temporary, name, path.stat().st_size)
        return name

    def add_bytes(self, data: bytes) -> str:
        name = f"sha256:{hashlib.sha256(data).hexdigest()}"
        temporary = self.root / BLOBS / f".incoming-{os.getpid()}"
        temporary.write_bytes(data)
        self._keep(temporary, name, len(data))
        return name

    def _keep(self, temporary: Path, digest: str, size: int) -> None:
        self.sizes[digest] = size
        if digest in self.omit:
            self.omitted.add(digest)
            temporary.unlink()
        else:
            os.replace(temporary, blob_path(self.root, digest))

    def add_artifact(self, artifacts: list[Artifact], files: list[Path]) -> Descriptor:
        """One artifact manifest for files of one thing (a wheel; a model's files)."""
        first = artifacts[0]
        layers = []
        for artifact, file in zip(artifacts, files, strict=True):
            digest = self.add_file(file, artifact.sha256)
            layers.append(
                Descriptor(
                    layer_type(artifact.kind), digest, artifact.size, {TITLE: artifact.path}
                ).to_json()
            )
        config = self.add_bytes(EMPTY_CONFIG)
        annotations = artifact_annotations(first)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "artifactType": artifact_type(first.kind),
            "config": {"mediaType": MEDIA_EMPTY, "digest": config, "size": len(EMPTY_CONFIG)},
            "layers": layers,
            "annotations": annotations,
        }
        data = dumps(manifest)
        descriptor = Descriptor(
            MEDIA_MANIFEST,
            self.add_bytes(data),
            len(data),
            annotations,
            artifact_type(first.kind),
        )
        self.manifests.append(descriptor)
        return descriptor

    def add_image(self, layout: Path, manifest_digest: str, ref_name: str) -> Descriptor:
        """A container image from a mirror's OCI layout: its manifest, config and layers."""
        manifest_file = blob_path(layout, manifest_digest)
        try:
            manifest = json.loads(manifest_file.read_bytes())
        except (OSError, ValueError) as error:
            raise BundleError(f"{manifest_file}: not a readable image manifest: {error}") from None
        blobs = [manifest["config"], *manifest.get("layers", [])]
        for blob in blobs:
            self.add_file(blob_path(layout, blob["digest"]), blob["digest"].removeprefix("sha256:"))
        digest = self.add_file(manifest_file, manifest_digest.removeprefix("sha256:"))
        descriptor = Descriptor(
            manifest.get("mediaType", MEDIA_MANIFEST),
            digest,
            manifest_file.stat().st_size,
            {REF_NAME: ref_name},
        )
        self.manifests.append(descriptor)
        return descriptor

    def write_layout(self) -> None:
        (self.root / LAYOUT_FILE).write_bytes(dumps({"imageLayoutVersion": "1.0.0"}))
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [m.to_json() for m in self.manifests],
        }
        (self.root / INDEX_FILE).write_bytes(dumps(index))


def artifact_annotations(artifact: Artifact) -> dict[str, str]:
    annotations = {
        "org.opencontainers.image.title": artifact.name,
        "org.opencontainers.image.version": artifact.version,
        "org.opencontainers.image.source": artifact.source,
        "io.sovereign.kind": artifact.kind,
    }
    if artifact.licence:
        annotations["org.opencontainers.image.licenses"] = artifact.licence
    if artifact.purl:
        annotations["io.sovereign.purl"] = artifact.purl
    return annotations


class BundleError(Exception):
    """A bundle that cannot be made, read or trusted; the message names the file."""


def move_into_place(staging: Path, out: Path) -> None:
    """The finished bundle appears at `out` whole, or not at all."""
    if out.exists():
        if any(out.iterdir()):
            raise BundleError(f"{out} exists and is not empty; give a new directory")
        out.rmdir()
    os.replace(staging, out)


def new_staging(out: Path) -> Path:
    """A fresh private directory beside `out`, for a result that appears at `out` whole.
    mkdtemp never reuses or follows an existing name, so nothing planted there is used."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as error:
        raise BundleError(f"{out}: cannot write beside it: {error.strerror}") from None


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
