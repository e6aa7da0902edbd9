"""The contract between toolkit and gateway: the versioned config, enumerations, key files.

The toolkit renders `GatewayConfig`, the gateway reads it; nothing else of the gateway is
imported here, so the toolkit may depend on this module alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Literal, get_args

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# -- enumerations, each defined once -------------------------------------------------

Kind = Literal["personal", "edge", "air-gapped", "datacenter"]
IdentityProvider = Literal["keycloak", "local"]
SigningAlgorithm = Literal["RS256", "ES256", "EdDSA"]
PolicyEngineKind = Literal["embedded", "remote"]
DlpMode = Literal["block", "redact", "log"]
Engine = Literal["vllm", "llamacpp", "upstream"]
# int4 is a 4-bit GGUF for llama.cpp; vLLM names its 4-bit formats (awq, gptq,
# compressed-tensors, bitsandbytes) since each loads a different checkpoint layout.
Quantization = Literal["int4", "awq", "gptq", "compressed-tensors", "bitsandbytes", "fp8", "none"]
EmbeddingEngine = Literal["embedded", "upstream"]
VectorStore = Literal["embedded", "qdrant"]
KeySource = Literal["tpm", "passphrase", "file"]
# Lowest first: a caller cleared for a level sees it and every level below.
Classification = Literal["public", "internal", "confidential", "secret"]
CLASSIFICATIONS: tuple[Classification, ...] = get_args(Classification)
TlsMode = Literal["files", "local_ca"]

# -- durations, as profiles and admin commands write them ------------------------------

DURATION_PATTERN = r"^([1-9][0-9]*)([smhdwy])$"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def duration_seconds(value: str) -> int:
    """Seconds in a duration such as `90s`, `15m`, `24h`, `30d`, `2w` or `7y` (365-day years)."""
    match = re.match(DURATION_PATTERN, value)
    if match is None:
        raise ValueError(f"expected a duration like 30s, 15m, 24h, 90d, 2w or 7y, got {value!r}")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


# -- the config file ---------------------------------------------------------------

SCHEMA_VERSION: Literal[2] = 2
# Where `sovereign render` writes the config, relative to the render directory.
CONFIG_PATH = Path("gateway") / "config.json"
# In a local CA's directory: its certificate, which clients of the node trust.
LOCAL_CA_CERTIFICATE = "ca.pem"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TLS(_Strict):
    mode: TlsMode = Field(
        description="files: a certificate and key the operator provides; local_ca: the "
        "gateway keeps a node-local CA in ca_dir and issues its own server certificate"
    )
    certificate: str | None = Field(description="files: the PEM chain served to clients")
    key: str | None = Field(description="files: its private key (PEM)")
    ca_dir: str | None = Field(
        description="local_ca: the CA and server keys; ca.pem is for clients"
    )
    names: list[str] = Field(
        description="local_ca: the DNS names and IP addresses the server certificate covers"
    )

    @model_validator(mode="after")
    def _complete(self) -> TLS:
        if self.mode == "files" and (self.certificate is None or self.key is None):
            raise ValueError("mode files needs certificate and key")
        if self.mode == "local_ca" and (self.ca_dir is None or not self.names):
            raise ValueError("mode local_ca needs ca_dir and at least one name")
        return self


class Listen(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: TLS | None = Field(description="TLS 1.3 only; None: plain HTTP, loopback only")


class OIDC(_Strict):
    provider: IdentityProvider
    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    realm: str = Field(min_length=1)
    algorithms: list[SigningAlgorithm] = Field(min_length=1)
    clock_skew_seconds: int = Field(ge=0, le=300)
    local_issuer_dir: str | None = Field(
        description="provider local: the local issuer's key pair and JWKS; else discovery"
    )
    jwks_cache_seconds: int = Field(gt=0)
    jwks_refetch_interval_seconds: float = Field(
        ge=0, description="at most one JWKS fetch per interval when an unknown kid arrives"
    )
    service_clients: list[str] = Field(
        description="client ids (azp) whose tokens may call /embed and /query"
    )


class PolicyEngine(_Strict):
    engine: PolicyEngineKind
    opa_url: str = Field(min_length=1)
    decision: str = Field(min_length=1, description="the OPA rule path asked for each request")
    bundle: str = Field(
        min_length=1, description="directory with the Rego files and data.json; relative to here"
    )
    timeout_seconds: float = Field(gt=0, le=30)


class ComplianceLock(_Strict):
    required: bool
    manifest: str
    public_key: str


class ModelRoute(_Strict):
    name: str
    aliases: list[str]
    engine: Engine
    source: str
    sha256: str | None
    quantization: Quantization
    context_length: int = Field(gt=0)
    allowed_roles: list[str] = Field(min_length=1)
    replicas: list[str] = Field(
        description="OpenAI-compatible base URLs serving this model; empty: `weights` is run "
        "by the embedded engine (or sent to `upstream.url` when that is set)"
    )
    weights: str | None = Field(
        description="embedded engine: the weights file, checked against sha256 before loading"
    )
    concurrency: int = Field(gt=0, description="requests in flight per replica or worker")
    queue: int = Field(ge=0, description="requests that may wait for a slot; beyond it, 429")
    queue_timeout_seconds: float = Field(gt=0)
    timeout_seconds: float = Field(gt=0)
    workers: int = Field(gt=0, description="embedded engine: worker processes")
    threads: int | None = Field(gt=0, description="embedded engine: threads per worker")


class EmbeddingModel(_Strict):
    engine: EmbeddingEngine
    model: str = Field(min_length=1, description="the name /v1/embeddings answers to")
    weights: str | None = Field(description="embedded: the ONNX file, checked against sha256")
    sha256: str | None
    tokenizer: str = Field(description="tokenizer.json: chunk sizes are counted in its tokens")
    url: str | None = Field(description="upstream: the OpenAI-compatible base URL (…/v1)")
    dimensions: int = Field(gt=0)


class MemoryStore(_Strict):
    vector_store: VectorStore
    qdrant_url: str | None
    key_source: KeySource
    key_file: str | None
    tpm_tcti: str
    tpm_pcrs: list[int]
    data_dir: str
    embeddings: EmbeddingModel
    chunk_tokens: int = Field(gt=0)
    chunk_overlap: int = Field(ge=0)
    rag_chat: bool = Field(description="ground every chat completion on retrieved chunks")
    rag_top_k: int = Field(gt=0)
    rag_min_score: float = Field(ge=-1, le=1)
    max_document_bytes: int = Field(gt=0)
    default_retention_seconds: int | None = Field(gt=0)
    retention_interval_seconds: int = Field(gt=0)


class AuditLog(_Strict):
    path: str
    checkpoint_interval_seconds: int = Field(gt=0)
    checkpoint_records: int = Field(gt=0)
    retention_seconds: int = Field(gt=0)
    signing_key: str
    capture_content: bool
    segment_max_bytes: int = Field(gt=0, description="rotate to a new segment past this size")


class GatewayConfig(_Strict):
    schema_version: Literal[2]
    profile: str
    kind: Kind
    listen: Listen
    max_body_bytes: int = Field(gt=0)
    egress_default: Literal["deny"]
    oidc: OIDC
    roles: dict[str, list[str]]
    policy: PolicyEngine
    models: list[ModelRoute] = Field(min_length=1)
    memory: MemoryStore
    audit: AuditLog
    lock: ComplianceLock

    @field_validator("schema_version", mode="before")
    @classmethod
    def _known_version(cls, value: object) -> object:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"this gateway reads config schema_version {SCHEMA_VERSION}, not {value!r}; "
                "render it again with the toolkit that matches this gateway"
            )
        return value


class ConfigError(ValueError):
    """A config file that cannot be read or is not valid; the message names file and field."""


def load_config(path: Path) -> GatewayConfig:
    """Read a rendered config; relative paths in it are relative to the file's directory."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return GatewayConfig.model_validate_json(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"{path} is not a valid gateway config: {details}") from None


def resolve(config_path: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else (config_path.parent / candidate).resolve()


# -- Ed25519 key files and crash-safe writes -----------------------------------------


class KeyFileError(ValueError):
    """A key file that cannot be read or is not an Ed25519 key; the message names it."""


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (it must not exist), write and fsync it; the caller fsyncs the dir."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` via a temp file in the same directory."""
    temp = temp_beside(path)
    try:
        write_new(temp, data, mode)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in `path` (PEM PKCS8); created 0600, atomically, when missing."""
    if not path.exists():
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
            os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
        temp = temp_beside(path)
        try:
            write_new(temp, private_pem(Ed25519PrivateKey.generate()), 0o600)
            # link, unlike rename, fails if another process created the key meanwhile;
            # then that key wins and every racer loads it below.
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return load_private_key(path)
