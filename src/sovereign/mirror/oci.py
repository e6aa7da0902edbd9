"""Container images from a registry (the distribution API, over `requests`), saved as an OCI
image layout that `skopeo copy oci:<dir>:<ref name> docker://...` pushes into the node's own
registry.

What the layout holds, and why:

- Ref names are the normalized source reference: `127.0.0.1:5000/team/app:1.0`,
  `docker.io/library/debian:12`, or `registry/repo@sha256:<hex>` for a reference by digest
  alone. The OCI ref-name grammar allows `:`, `@` and `/`, and skopeo splits `oci:<dir>:<ref>`
  at the first colon, so `oci:out:127.0.0.1:5000/team/app:1.0` works. A reference with both
  a tag and a digest is named by its tag, which the digest was checked against.
- One platform (the usual case: a node has one architecture): the ref name points at that
  platform's image manifest, byte for byte as the registry serves it, so it keeps its digest
  and `skopeo copy` needs no `--all` or `--override-arch` whatever the build host runs.
  Several platforms: the ref name points at a new OCI index of just those platforms, as
  `skopeo copy --multi-arch` with chosen platforms does; its digest is new, so push it with
  `skopeo copy --all`. Either way the entry's annotations record the source reference and
  the digest the source resolved to (the upstream index's, when it was one).
- Docker schema 2 manifests are rewritten as OCI manifests with only their media types
  changed; config and layer bytes, and so their digests, stay as they were. skopeo and
  umoci skip or refuse a Docker manifest in an OCI layout, and skopeo's own conversion
  re-encodes the config, which this does not.
- index.json is written once every blob of every image is in place; a failed run leaves
  the blobs it verified, reused next time, and the previous index.json.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.auth import AuthBase

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import Download, Fetcher, MirrorError, json_of
from sovereign.tools import sha256_file

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff"
OCI_LAYER = "application/vnd.oci.image.layer.v1"
INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
# What a Docker schema 2 manifest's media types become in OCI. A foreign (Windows) layer is
# not here: it lives outside the registry and no Linux node runs it.
DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    f"{DOCKER_LAYER}.tar.gzip": f"{OCI_LAYER}.tar+gzip",
    f"{DOCKER_LAYER}.tar": f"{OCI_LAYER}.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
LICENSES = "org.opencontainers.image.licenses"
SOURCE = "sovereign.mirror.source"
SOURCE_DIGEST = "sovereign.mirror.source-digest"
# distribution refuses manifests over 4 MiB; a bigger answer is not a manifest.
MAX_MANIFEST = 4 << 20
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

# distribution/reference's grammar, lowercase paths only.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The OCI image layout's grammar for org.opencontainers.image.ref.name.
_OCI_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)
_SCOPED_PATH = re.compile(r"/v2/(.+)/(?:manifests|blobs|tags)/")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


# ---- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    registry: str  # as written, normalized: "docker.io", "127.0.0.1:5000"
    repository: str  # "team/app", "library/debian"
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def ref_name(self) -> str:
        """The layout's name for it: by tag where it has one (the digest was checked)."""
        return f"{self.name}:{self.tag}" if self.tag else f"{self.name}@{self.digest}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry


def parse_reference(text: str) -> ImageRef:
    """`[registry/]path[:tag][@sha256:hex]`, normalized as docker does: no registry means
    docker.io, whose one-component names are under `library/`, and no tag means `latest`."""
    rest, _, digest = text.strip().partition("@")
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
    first, slash, path = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry = first
    else:
        registry, path = DOCKER_HUB, rest
    if registry in {"index.docker.io", "registry-1.docker.io"}:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path) or len(f"{registry}/{path}") > 255:
        raise MirrorError(f"{text}: not a valid repository name (lowercase, [a-z0-9._-/])")
    if tag is not None and not _TAG.fullmatch(tag):
        raise MirrorError(f"{text}: {tag!r} is not a valid tag")
    if digest and not _DIGEST.fullmatch(digest):
        raise MirrorError(f"{text}: only sha256 digests are supported, as sha256:<64 hex>")
    if tag is None and not digest:
        tag = "latest"
    ref = ImageRef(registry, path, tag, digest or None)
    if not _OCI_REF_NAME.fullmatch(ref.ref_name):
        raise MirrorError(f"{text}: {ref.ref_name!r} cannot name an image in an OCI layout")
    return ref


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise MirrorError(f"{text!r}: a platform is os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, platform: Mapping[str, Any]) -> bool:
        """A platform without a variant takes any variant, as docker's does."""
        return (
            platform.get("os") == self.os
            and platform.get("architecture") == self.architecture
            and (self.variant is None or platform.get("variant") == self.variant)
        )

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def _platform_text(platform: Mapping[str, Any]) -> str:
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(part) for part in parts if part)


# ---- authentication ---------------------------------------------------------------------


class RegistryAuth(AuthBase):
    """Answers a registry's 401: `Bearer` by asking the challenge's realm (a token server)
    for a token for its service and scope, `Basic` with the registry's credentials; then
    resends the request once, as requests' HTTPDigestAuth does.

    Tokens are kept per registry and repository scope, so an image's blobs, fetched by
    `Fetcher` in several threads, go out with the token its manifest earned. `credentials`
    maps a registry (as in references: `docker.io`, `host:port`) to (user, password).
    """

    def __init__(
        self,
        http: requests.Session,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        timeout: tuple[float, float] = (10.0, 60.0),
    ) -> None:
        self._http = http
        self._timeout = timeout
        self._credentials = {
            _api_netloc(registry): pair for registry, pair in (credentials or {}).items()
        }
        self._headers: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        header = self._headers.get(_scope_key(str(request.url)))
        if header is not None:
            request.headers["Authorization"] = header
        request.hooks["response"].append(self._on_response)
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        url = str(response.request.url)
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        netloc = urlsplit(url).netloc
        if scheme != "bearer" and not (scheme == "basic" and netloc in self._credentials):
            return response
        # Read and release the 401 first: asking for a token may raise, and a response
        # dropped unread keeps its connection from the pool.
        _ = response.content
        response.close()
        if scheme == "bearer":
            header = f"Bearer {self._token(netloc, params)}"
        else:
            user, password = self._credentials[netloc]
            header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers[_scope_key(url)] = header
        retry = response.request.copy()
        retry.headers["Authorization"] = header
        again: requests.Response = response.connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again

    def _token(self, netloc: str, params: Mapping[str, str]) -> str:
        realm = params.get("realm")
        if not realm:
            raise MirrorError(f"{netloc}: a Bearer challenge without a realm")
        query = {key: params[key] for key in ("service", "scope") if key in params}
        credentials = self._credentials.get(netloc)
        # Threads that meet the same challenge together ask the token server once.
        with self._lock:
            try:
                answer = self._http.get(
                    realm, params=query, auth=credentials, timeout=self._timeout
                )
            except requests.RequestException as error:
                raise MirrorError(f"{netloc}: token server {realm}: {error}") from None
        who = f"user {credentials[0]!r}" if credentials else "anonymous access"
        if answer.status_code in (401, 403):
            raise MirrorError(
                f"{netloc}: token server {realm} refused {who} "
                f"(HTTP {answer.status_code}); check the credentials for {netloc}"
            )
        if not answer.ok:
            raise MirrorError(f"{netloc}: token server {realm}: HTTP {answer.status_code}")
        body = json_of(answer)
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MirrorError(f"{netloc}: token server {realm} answered without a token")
        return token


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _scope_key(url: str) -> tuple[str, str]:
    """A request's registry and repository: what its token is good for."""
    parts = urlsplit(url)
    match = _SCOPED_PATH.match(parts.path)
    return parts.netloc, match.group(1) if match else ""


def _api_netloc(registry: str) -> str:
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


# ---- manifests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    raw: Mapping[str, Any]

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @classmethod
    def parse(cls, data: Any, where: str) -> Descriptor:
        """One from a manifest, which came from the network: its digest names a file."""
        if not isinstance(data, dict):
            raise MirrorError(f"{where}: a descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise MirrorError(f"{where}: unsupported digest {digest!r} (sha256 only)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MirrorError(f"{where}: descriptor {digest} has no valid size")
        return cls(str(data.get("mediaType", "")), digest, size, data)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    body: bytes
    digest: str
    document: dict[str, Any]


@dataclass
class Image:
    """An image manifest to store under `ref`'s name, and what it took to get there."""

    ref: ImageRef
    manifest: Manifest
    platform: dict[str, Any] | None
    config: Descriptor = field(init=False)
    layers: list[Descriptor] = field(init=False)

    def __post_init__(self) -> None:
        where = f"{self.ref} ({self.manifest.digest})"
        self.config = Descriptor.parse(self.manifest.document.get("config"), where)
        layers = self.manifest.document.get("layers")
        if not isinstance(layers, list):
            raise MirrorError(f"{where}: the manifest has no layers list")
        self.layers = [Descriptor.parse(layer, where) for layer in layers]
        if self.manifest.media_type == DOCKER_MANIFEST:
            for item in (self.config, *self.layers):
                if item.media_type not in DOCKER_TO_OCI:
                    raise MirrorError(f"{where}: unsupported media type {item.media_type!r}")


@dataclass
class Resolved:
    """What one reference came to: its source manifest and the images chosen from it."""

    ref: ImageRef
    source: Manifest
    images: list[Image]


class RegistryClient:
    def __init__(
        self, fetcher: Fetcher, auth: RegistryAuth, plain_http: Collection[str] = ()
    ) -> None:
        self.fetcher = fetcher
        self.auth = auth
        self.plain_http = set(plain_http)

    def base(self, ref: ImageRef) -> str:
        """Loopback registries, and those listed as plain HTTP, are spoken to without TLS."""
        plain = is_loopback(ref.registry) or ref.registry in self.plain_http
        return f"{'http' if plain else 'https'}://{ref.api_host}/v2/{ref.repository}"

    def manifest(self, ref: ImageRef, reference: str) -> Manifest:
        url = f"{self.base(ref)}/manifests/{reference}"
        try:
            response = self.fetcher.http.get(
                url, headers={"Accept": ACCEPT}, auth=self.auth, timeout=self.fetcher.timeout
            )
        except requests.RequestException as error:
            raise MirrorError(f"{ref}: {url}: {error}") from None
        if not response.ok:
            raise MirrorError(_refusal(ref, reference, response))
        body = response.content
        if len(body) > MAX_MANIFEST:
            raise MirrorError(f"{ref}: the manifest at {url} is over {MAX_MANIFEST} bytes")
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        served = response.headers.get("Docker-Content-Digest", "")
        if served.startswith("sha256:") and served != digest:
            raise MirrorError(f"{ref}: {url} says its digest is {served}, its bytes are {digest}")
        if reference.startswith("sha256:") and digest != reference:
            raise MirrorError(f"{ref}: the manifest for {reference} has digest {digest}")
        document = json_of(response)
        if not isinstance(document, dict):
            raise MirrorError(f"{ref}: {url} is not a manifest")
        media_type = _media_type(document, response.headers.get("Content-Type", ""))
        if media_type not in INDEXES | IMAGES:
            raise MirrorError(f"{ref}: unsupported media type {media_type!r} at {url}")
        return Manifest(media_type, body, digest, document)

    def blob(self, ref: ImageRef, item: Descriptor, out: Path) -> Download:
        return Download(
            url=f"{self.base(ref)}/blobs/{item.digest}",
            dest=_blob_path(out, item.hex),
            sha256=item.hex,
            size=item.size,
            auth=self.auth,
        )


def _refusal(ref: ImageRef, reference: str, response: requests.Response) -> str:
    what = f"tag {reference!r}" if ref.tag == reference else f"manifest {reference}"
    codes = _error_codes(response)
    if response.status_code == 404:
        return f"{ref}: {what} not found in {ref.name}{codes}"
    if response.status_code in (401, 403):
        return (
            f"{ref}: {ref.registry} refused access, HTTP {response.status_code}{codes}; "
            f"check the credentials for {ref.registry}"
        )
    return f"{ref}: {what}: HTTP {response.status_code} {response.reason}{codes}"


def _error_codes(response: requests.Response) -> str:
    """The distribution API's error codes (MANIFEST_UNKNOWN, NAME_UNKNOWN, ...), if any."""
    try:
        errors = response.json().get("errors", [])
        codes = [str(error.get("code")) for error in errors if isinstance(error, dict)]
    except (ValueError, AttributeError):
        return ""
    return f" ({', '.join(codes)})" if codes else ""


def _media_type(document: Mapping[str, Any], content_type: str) -> str:
    """The manifest's own mediaType, else the header's; schema 1 has neither of ours."""
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = content_type.split(";")[0].strip()
    if header in INDEXES | IMAGES:
        return header
    if document.get("schemaVersion") == 2 and "manifests" in document:
        return OCI_INDEX
    if document.get("schemaVersion") == 2 and "config" in document:
        return OCI_MANIFEST
    return header or f"schemaVersion {document.get('schemaVersion')}"


def is_loopback(registry: str) -> bool:
    host = urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- resolving --------------------------------------------------------------------------


def resolve(client: RegistryClient, ref: ImageRef, platforms: Sequence[Platform]) -> Resolved:
    source = client.manifest(ref, ref.digest or str(ref.tag))
    if ref.digest and ref.tag:
        tagged = client.manifest(ref, ref.tag)
        if tagged.digest != ref.digest:
            raise MirrorError(f"{ref}: tag {ref.tag!r} is now {tagged.digest}, not {ref.digest}")
    if source.media_type in IMAGES:
        return Resolved(ref, source, [Image(ref, source, None)])
    chosen = _choose(ref, source, platforms)
    images = []
    for item in chosen:
        manifest = client.manifest(ref, item.digest)
        if manifest.media_type not in IMAGES or len(manifest.body) != item.size:
            raise MirrorError(f"{ref}: {item.digest} in the index is not the image it lists")
        images.append(Image(ref, manifest, dict(item.raw.get("platform") or {})))
    return Resolved(ref, source, images)


def _choose(ref: ImageRef, index: Manifest, platforms: Sequence[Platform]) -> list[Descriptor]:
    entries = index.document.get("manifests")
    if not isinstance(entries, list):
        raise MirrorError(f"{ref}: the index {index.digest} has no manifests list")
    images = [Descriptor.parse(entry, str(ref)) for entry in entries]
    images = [item for item in images if item.media_type in IMAGES]
    chosen: list[Descriptor] = []
    for wanted in platforms:
        match = next((i for i in images if wanted.matches(i.raw.get("platform") or {})), None)
        if match is None:
            available = sorted({_platform_text(i.raw.get("platform") or {}) for i in images})
            raise MirrorError(
                f"{ref}: no image for {wanted}; the index has {', '.join(available) or 'none'}"
            )
        if match not in chosen:
            chosen.append(match)
    return chosen


def _check_platform(image: Image, config: Mapping[str, Any], platforms: Sequence[Platform]) -> None:
    """A single-platform reference must still suit the node; an index was chosen from."""
    if image.platform is not None or image.config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
        return
    if not any(wanted.matches(config) for wanted in platforms):
        wanted_text = ", ".join(str(p) for p in platforms)
        raise MirrorError(
            f"{image.ref}: a single-platform image for {_platform_text(config)}, not {wanted_text}"
        )


# ---- the layout -------------------------------------------------------------------------


def _blob_path(out: Path, hexdigest: str) -> Path:
    return out / "blobs" / "sha256" / hexdigest


def _write_atomic(path: Path, data: bytes) -> None:
    # Beside the target, so the rename is atomic; opened as usual, so the umask applies.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _put_blob(out: Path, data: bytes) -> None:
    path = _blob_path(out, hashlib.sha256(data).hexdigest())
    if not (path.is_file() and sha256_file(path) == path.name):
        _write_atomic(path, data)


def _as_oci(image: Image) -> bytes:
    """The image's manifest as stored: as served if OCI, else with OCI media types."""
    if image.manifest.media_type == OCI_MANIFEST:
        return image.manifest.body
    document = dict(image.manifest.document)
    document["mediaType"] = OCI_MANIFEST
    document["config"] = {**image.config.raw, "mediaType": DOCKER_TO_OCI[image.config.media_type]}
    document["layers"] = [
        {**layer.raw, "mediaType": DOCKER_TO_OCI[layer.media_type]} for layer in image.layers
    ]
    return json.dumps(document, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}


def _store(out: Path, resolved: Resolved) -> tuple[dict[str, Any], list[bytes]]:
    """Write the manifests of one reference; its index.json entry and its image manifests."""
    manifests: list[bytes] = []
    children: list[dict[str, Any]] = []
    for image in resolved.images:
        body = _as_oci(image)
        _put_blob(out, body)
        manifests.append(body)
        platform = {"platform": image.platform} if image.platform else {}
        children.append(_descriptor(OCI_MANIFEST, body, **platform))
    annotations = {
        REF_NAME: resolved.ref.ref_name,
        SOURCE: str(resolved.ref),
        SOURCE_DIGEST: resolved.source.digest,
    }
    if len(children) == 1:
        return {**children[0], "annotations": annotations}, manifests
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    body = json.dumps(index, separators=(",", ":")).encode()
    _put_blob(out, body)
    return _descriptor(OCI_INDEX, body, annotations=annotations), manifests


def _write_index(out: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Merge into index.json: an entry replaces the one of the same ref name."""
    path = out / "index.json"
    existing: list[Any] = []
    if path.is_file():
        try:
            existing = json.loads(path.read_text()).get("manifests", [])
        except (ValueError, AttributeError):
            raise MirrorError(f"{path}: not an OCI image index; move it away") from None
    new = list(entries)
    names = {entry["annotations"][REF_NAME] for entry in new}
    kept = [
        entry
        for entry in existing
        if not (isinstance(entry, dict) and entry.get("annotations", {}).get(REF_NAME) in names)
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept + new}
    _write_atomic(path, json.dumps(index, indent=2).encode() + b"\n")


def _write_layout_marker(out: Path) -> None:
    marker = out / "oci-layout"
    if not marker.is_file():
        _write_atomic(marker, b'{"imageLayoutVersion": "1.0.0"}\n')


# ---- the mirror -------------------------------------------------------------------------


def mirror_images(
    refs: Sequence[str],
    out: Path,
    fetcher: Fetcher,
    platforms: Sequence[str] = ("linux/amd64",),
    *,
    credentials: Mapping[str, tuple[str, str]] | None = None,
    plain_http: Collection[str] = (),
) -> list[Artifact]:
    """Mirror `refs` into the OCI layout `out`, for `platforms`; one Artifact per image.

    `credentials` maps a registry (`docker.io`, `host:port`) to a user and password for its
    token server or Basic auth; `plain_http` lists registries reached without TLS besides
    loopback ones.
    """
    wanted = [Platform.parse(text) for text in platforms]
    if not wanted:
        raise MirrorError("no platform to mirror images for")
    client = RegistryClient(
        fetcher, RegistryAuth(fetcher.http, credentials, fetcher.timeout), plain_http
    )
    resolved = [resolve(client, parse_reference(text), wanted) for text in refs]
    # References that share a ref name (`app:1.0`, `app:1.0@sha256:...`) were each checked;
    # the layout can name only one, the last.
    resolved = list({item.ref.ref_name: item for item in resolved}.values())
    images = [image for item in resolved for image in item.images]
    if not images:
        return []
    # Configs first: they are small, and say whether a single-platform image suits the node
    # before its layers are fetched.
    _fetch(client, out, [(image.ref, image.config) for image in images], "oci configs")
    configs = [_read_config(out, image) for image in images]
    for image, config in zip(images, configs, strict=True):
        _check_platform(image, config, wanted)
    layers = [(image.ref, layer) for image in images for layer in image.layers]
    _fetch(client, out, layers, "oci layers")
    entries = []
    stored: list[bytes] = []
    for item in resolved:
        entry, manifests = _store(out, item)
        entries.append(entry)
        stored.extend(manifests)
    _write_layout_marker(out)
    _write_index(out, entries)
    return [
        _artifact(image, body, config)
        for image, body, config in zip(images, stored, configs, strict=True)
    ]


def _fetch(
    client: RegistryClient, out: Path, blobs: Iterable[tuple[ImageRef, Descriptor]], what: str
) -> None:
    # One download per digest: two images sharing a layer must not write one `.part` twice.
    unique: dict[str, Download] = {}
    for ref, item in blobs:
        unique.setdefault(item.digest, client.blob(ref, item, out))
    client.fetcher.download_all(unique.values(), what)


def _read_config(out: Path, image: Image) -> dict[str, Any]:
    """The config as JSON where it is an image config; {} for other artifacts' configs."""
    if image.config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
        return {}
    try:
        config = json.loads(_blob_path(out, image.config.hex).read_bytes())
    except ValueError:
        raise MirrorError(f"{image.ref}: its config {image.config.digest} is not JSON") from None
    return config if isinstance(config, dict) else {}


def _licence(image: Image, config: Mapping[str, Any]) -> str | None:
    """The image's own statement: its config's label, else its manifest's annotation."""
    labels = _mapping(_mapping(config.get("config")).get("Labels"))
    annotations = _mapping(image.manifest.document.get("annotations"))
    value = labels.get(LICENSES) or annotations.get(LICENSES)
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _artifact(image: Image, body: bytes, config: Mapping[str, Any]) -> Artifact:
    ref = image.ref
    digest = hashlib.sha256(body).hexdigest()
    qualifiers = f"repository_url={quote(ref.name, safe='/:')}"
    if ref.tag:
        qualifiers += f"&tag={quote(ref.tag, safe='')}"
    name = quote(ref.repository.rsplit("/", 1)[-1], safe="")
    return Artifact(
        kind="oci-image",
        name=ref.repository,
        version=ref.tag or str(ref.digest),
        path=f"blobs/sha256/{digest}",
        sha256=digest,
        size=len(body),
        source=str(ref),
        licence=_licence(image, config),
        purl=f"pkg:oci/{name}@sha256%3A{digest}?{qualifiers}",
    )
