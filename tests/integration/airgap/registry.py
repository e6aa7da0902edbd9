"""A real registry for the OCI mirror's tests: Debian's `docker-registry` (distribution 2.8),
seeded by skopeo from image layouts built here, and a token server for its `auth: token`.

The images are built by hand (a gzipped tar layer, a config, a manifest, an index) because
the tests reach nothing but loopback, so no base image can be pulled.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.integration.conftest import free_port, start, stop, wait_listening

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
START_TIMEOUT_S = 30
SKOPEO_TIMEOUT_S = 60
LICENCE = "Apache-2.0"


def skopeo(*args: str) -> str:
    """Run skopeo against loopback registries, which serve plain HTTP; its stdout."""
    done = subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=SKOPEO_TIMEOUT_S,
    )
    assert done.returncode == 0, f"skopeo {' '.join(args)}:\n{done.stderr}"
    return done.stdout


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# ---- images -----------------------------------------------------------------------------


@dataclass
class Layout:
    """An OCI image layout being written, blob by blob."""

    root: Path

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = digest_of(data)
        path = self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def json_blob(self, document: dict[str, Any], media_type: str) -> dict[str, Any]:
        return self.blob(json.dumps(document, sort_keys=True).encode(), media_type)

    def finish(self, descriptor: dict[str, Any], ref_name: str) -> None:
        entry = {**descriptor, "annotations": {"org.opencontainers.image.ref.name": ref_name}}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        (self.root / "index.json").write_text(json.dumps(index))
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzipped tar of `files`, reproducible, and its diff ID (the uncompressed digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), digest_of(plain)


@dataclass(frozen=True)
class Image:
    """One platform's image in a seeded index: its manifest and the blobs it names."""

    platform: str
    manifest: dict[str, Any]  # the descriptor in the index
    config: str
    layers: tuple[str, ...]

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def blobs(self) -> set[str]:
        return {self.config, *self.layers}


def build_image(layout: Layout, arch: str, base: tuple[bytes, str], labels: bool) -> Image:
    """An image for linux/`arch`: the shared base layer and a layer of its own."""
    own, own_diff = _layer({f"opt/app/{arch}.txt": f"built for {arch}\n".encode()})
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [base[1], own_diff]},
    }
    if labels:
        config["config"]["Labels"] = {"org.opencontainers.image.licenses": LICENCE}
    config_descriptor = layout.json_blob(config, OCI_CONFIG)
    layers = [layout.blob(base[0], OCI_LAYER), layout.blob(own, OCI_LAYER)]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": layers,
    }
    descriptor = layout.json_blob(manifest, OCI_MANIFEST)
    descriptor["platform"] = {"os": "linux", "architecture": arch}
    return Image(
        f"linux/{arch}",
        descriptor,
        config_descriptor["digest"],
        tuple(layer["digest"] for layer in layers),
    )


def build_index(root: Path, tag: str, arches: tuple[str, ...] = ("amd64", "arm64")) -> list[Image]:
    """An OCI layout at `root` whose `tag` is an image index of one image per arch."""
    layout = Layout(root)
    base = _layer({"etc/os-release": b"ID=sovereign-test\n", "bin/hello": b"#!/bin/sh\necho hi\n"})
    images = [build_image(layout, arch, base, labels=True) for arch in arches]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [i.manifest for i in images]}
    layout.finish(layout.json_blob(index, OCI_INDEX), tag)
    return images


# ---- registry ---------------------------------------------------------------------------


@dataclass
class Registry:
    """`docker-registry serve` on 127.0.0.1 over `storage`; `auth` is its `auth:` section."""

    storage: Path
    log: Path
    auth: dict[str, Any] | None = None
    read_only: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "maintenance": {
                    "uploadpurging": {"enabled": False},
                    "readonly": {"enabled": self.read_only},
                },
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.auth is not None:
            config["auth"] = self.auth
        path = self.log.with_suffix(".yml")
        path.write_text(json.dumps(config))  # JSON is YAML
        self.process = start(["docker-registry", "serve", str(path)], self.log)
        wait_listening(f"http://{self.host}/v2/", self.process, self.log, START_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def blob_data(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / f"docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"

    def push(self, layout: Path, tag: str, repository: str, *extra: str) -> None:
        skopeo(
            "copy", "--all", "--dest-tls-verify=false", *extra,
            f"oci:{layout}:{tag}", f"docker://{self.host}/{repository}",
        )  # fmt: skip


@contextmanager
def registry(
    storage: Path, log: Path, auth: dict[str, Any] | None = None, read_only: bool = False
) -> Iterator[Registry]:
    server = Registry(storage, log, auth, read_only)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def htpasswd(path: Path, user: str, password: str) -> Path:
    """The one line of an htpasswd file; distribution reads bcrypt only."""
    with warnings.catch_warnings():
        # crypt goes in 3.13; libcrypt's bcrypt is what this Python has without a package.
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)  # noqa: S324 (bcrypt, not MD5)
    path.write_text(f"{user}:{crypt.crypt(password, salt)}\n")
    return path


# ---- token server -----------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """Signs registry tokens (RS256) with a key whose self-signed certificate the registry
    trusts as its `rootcertbundle`; the certificate rides in the JWT's `x5c` header."""

    service: str
    name: str = "sovereign-test-issuer"
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def token(self, subject: str, scopes: list[str]) -> str:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.name,
            "sub": subject,
            "aud": self.service,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "access": [_grant(scope) for scope in scopes],
        }
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _grant(scope: str) -> dict[str, Any]:
    """Pull only, whatever was asked: the mirror must never need more."""
    kind, name, _actions = scope.split(":")
    return {"type": kind, "name": name, "actions": ["pull"]}


@dataclass
class TokenServer:
    """The realm of a token-auth registry, in a thread on 127.0.0.1: a token for the one
    user and password it knows, 401 for anything else. `requests` logs every query."""

    issuer: TokenIssuer
    user: str
    password: str
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def answer(self, query: dict[str, list[str]], authorization: str) -> tuple[int, dict[str, Any]]:
        self.requests.append(query)
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if authorization != f"Basic {expected}":
            return HTTPStatus.UNAUTHORIZED, {"details": "incorrect username or password"}
        if query.get("service") != [self.issuer.service]:
            return HTTPStatus.BAD_REQUEST, {"details": "unknown service"}
        token = self.issuer.token(self.user, query.get("scope", []))
        return HTTPStatus.OK, {"token": token, "expires_in": 300}

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                status, body = (
                    owner.answer(parse_qs(parts.query), self.headers.get("Authorization", ""))
                    if parts.path == "/token"
                    else (HTTPStatus.NOT_FOUND, {})
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def auth_config(self, bundle: Path) -> dict[str, Any]:
        """The registry's `auth:` section that sends its clients here."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.issuer.service,
                "issuer": self.issuer.name,
                "rootcertbundle": str(self.issuer.write_bundle(bundle)),
            }
        }


@contextmanager
def token_server(service: str, user: str, password: str) -> Iterator[TokenServer]:
    server = TokenServer(TokenIssuer(service), user, password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
