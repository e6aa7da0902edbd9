"""The node profile: one typed, strict model that every renderer reads.

Input is a mapping (from YAML); the kind's defaults are merged under it before
validation, so a validated `Profile` is fully resolved. Cross-field rules live in `rules`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator
from pydantic_core import PydanticCustomError
from sovereign_gateway.contract import EmbeddingEngine, IdentityProvider, PolicyEngineKind

from sovereign.profile import defaults
from sovereign.profile.rules import violations
from sovereign.profile.types import (
    AbsolutePath,
    Arch,
    ByteSize,
    Cidr,
    Classification,
    Destination,
    DlpMode,
    DnsLabel,
    Duration,
    Engine,
    Gpu,
    HostName,
    HostOS,
    HostPort,
    InterfaceCidr,
    IpAddress,
    KeySource,
    Kind,
    KvCacheDtype,
    MirrorKind,
    NodeRole,
    Pcr,
    Permission,
    Protocol,
    Quantization,
    SandboxRuntime,
    Sha256,
    SshPublicKey,
    TpmPolicy,
    VectorStore,
    WireGuardKey,
)


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Node(StrictModel):
    """One machine of the deployment."""

    name: DnsLabel
    role: NodeRole = "standalone"
    arch: Arch = "amd64"
    gpu: Gpu = "none"
    tpm: TpmPolicy = "optional"
    gpu_count: int = Field(
        default=1, ge=1, le=16, description="GPUs on the node, when gpu is not none"
    )


class Disk(StrictModel):
    """The node image's disk: the root file system and the encrypted data volume."""

    root_size: ByteSize = Field(default="2G", description="the root file system partition")
    data_size: ByteSize = Field(
        default="1G", description="the data partition, LUKS2-encrypted at first boot"
    )


class Host(StrictModel):
    os: HostOS = Field(description="the host operating system the image is built from")
    admin_user: DnsLabel = Field(
        default="sovereign", description="the one login: ssh key only, from admin_networks"
    )
    admin_keys: list[SshPublicKey] = Field(
        default_factory=list, description="OpenSSH public keys that may log in as admin_user"
    )
    disk: Disk = Field(default_factory=Disk)
    disk_pcrs: list[Pcr] = Field(
        default=[7],
        min_length=1,
        description="PCRs the data volume's TPM2 key is bound to (7: the Secure Boot state)",
    )
    attestation_pcrs: list[Pcr] = Field(
        default=[0, 2, 4, 7],
        min_length=1,
        description="PCRs the node's attestation key quotes: firmware, option ROMs, boot loader "
        "and kernel, Secure Boot state",
    )


class MeshPeer(StrictModel):
    name: DnsLabel
    public_key: WireGuardKey
    endpoint: HostPort | None = Field(
        default=None, description="host:port the peer listens on; unset for roaming peers"
    )
    allowed_ips: list[Cidr] = Field(min_length=1)
    persistent_keepalive: int | None = Field(default=None, ge=1, le=65535)


class Mesh(StrictModel):
    """The WireGuard mesh between the nodes of a deployment and its federation peers."""

    enabled: bool
    interface: str = Field(default="wg0", pattern=r"^[a-z][a-z0-9]{0,14}$")
    listen_port: int = Field(default=51820, ge=1, le=65535)
    address: InterfaceCidr | None = Field(
        default=None, description="this node's mesh address with the mesh prefix length"
    )
    peers: list[MeshPeer] = Field(default_factory=list)


class EgressRule(StrictModel):
    to: Destination
    protocol: Protocol = "tcp"
    description: str = Field(min_length=1)


class Egress(StrictModel):
    """Outbound traffic: everything is dropped except the explicit allowlist."""

    default: Literal["deny"] = Field(
        description="always deny; allowed destinations are listed one by one in `allow`"
    )
    allow: list[EgressRule] = Field(default_factory=list)


class Network(StrictModel):
    mesh: Mesh
    egress: Egress
    admin_networks: list[Cidr] = Field(
        description="networks inbound ssh is accepted from", min_length=1
    )
    hosts: dict[HostName, IpAddress] = Field(
        default_factory=dict,
        description="static names (written to /etc/hosts): firewall rules need addresses, and "
        "a node without DNS still has to find its mirrors",
    )


class Mirror(StrictModel):
    """A local mirror the node installs from; air-gapped nodes reach nothing else."""

    kind: MirrorKind
    url: HttpUrl


class IdentityUser(StrictModel):
    """A person the realm knows; passwords are never part of a profile."""

    name: DnsLabel
    email: str = Field(
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="Keycloak's user profile needs it before the user can sign in",
    )
    roles: list[DnsLabel] = Field(min_length=1)


class ServiceClient(StrictModel):
    """A machine client (client-credentials grant), e.g. the retrieval worker."""

    name: DnsLabel
    roles: list[DnsLabel] = Field(min_length=1)


class Identity(StrictModel):
    """Who issues the tokens the gateway accepts: Keycloak, or on a personal node a local key."""

    provider: IdentityProvider = Field(
        default="keycloak",
        description=(
            "keycloak: tokens from a Keycloak realm rendered from this section; local (personal "
            "only): a key pair on this machine and `sovereign token` to mint tokens"
        ),
    )
    issuer: HttpUrl = Field(description="the OIDC issuer, {keycloak}/realms/{realm}")
    audience: str = Field(min_length=1, description="the `aud` the gateway requires")
    realm: DnsLabel
    roles: dict[DnsLabel, list[Permission]] = Field(
        min_length=1, description="what each realm role may do at the gateway"
    )
    users: list[IdentityUser] = Field(
        default_factory=list, description="users created in the rendered realm"
    )
    service_clients: list[ServiceClient] = Field(
        default_factory=list,
        description="clients whose tokens may call the internal endpoints /embed and /query",
    )
    local_key_dir: AbsolutePath = Field(
        default="/var/lib/sovereign/issuer",
        description="provider local: where the signing key pair and its JWKS live",
    )
    clearances: dict[DnsLabel, Classification] = Field(
        default_factory=dict,
        description=(
            "the highest document classification each role may read; a role left out gets "
            "secret when it holds admin, embed or query, else internal"
        ),
    )


class Serving(StrictModel):
    """How the gateway admits, queues and times out requests for one model."""

    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "requests in flight per replica or worker; default 1 for llamacpp (embedded or a "
            "server), 64 for vllm, 16 for other upstreams"
        ),
    )
    queue: int = Field(
        default=32, ge=0, le=100_000, description="requests that may wait; beyond it, 429"
    )
    queue_timeout: Duration = Field(
        default="30s", description="the longest a request waits for a slot before 429"
    )
    timeout: Duration = Field(default="120s", description="the longest one request may take")
    workers: int = Field(
        default=1, ge=1, le=64, description="embedded engine: worker processes, each with the model"
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="embedded engine: CPU threads per worker; default the CPUs / workers",
    )


class VllmSettings(StrictModel):
    """vLLM launch settings; one renderer turns them into the engine's arguments."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=16)
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=0.98,
        description="share of each GPU's memory vLLM takes for weights and PagedAttention blocks",
    )
    max_model_len: int | None = Field(
        default=None, ge=256, le=1_048_576, description="default: the model's context_length"
    )
    max_num_seqs: int = Field(default=256, ge=1, le=4096, description="sequences per batch")
    enable_prefix_caching: bool = True
    kv_cache_dtype: KvCacheDtype = "auto"
    port: int = Field(default=8000, ge=1, le=65535)


class ModelSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    aliases: list[str] = Field(default_factory=list)
    engine: Engine
    source: str = Field(
        min_length=1,
        description=(
            "pkg:<tool>/<file> (installed by `sovereign tools install`), bundle:<path> "
            "(inside an imported bundle), file:/<path>, hf:<org>/<repo>@<commit>/<file>, "
            "or for the upstream engine the OpenAI-compatible base URL"
        ),
    )
    sha256: Sha256 | None = None
    quantization: Quantization = "none"
    context_length: int = Field(ge=256, le=1_048_576)
    allowed_roles: list[DnsLabel] = Field(min_length=1)
    replicas: list[HttpUrl] = Field(
        default_factory=list,
        description=(
            "OpenAI-compatible base URLs (ending in /v1) of the servers that run this model; "
            "requests fail over between them. Empty for llamacpp: the gateway runs the model "
            "itself; empty for vllm on a datacenter: the Runtime stack's in-cluster service"
        ),
    )
    serving: Serving = Field(default_factory=Serving)
    vllm: VllmSettings | None = Field(
        default=None, description="engine vllm only; defaults apply when left out"
    )


class Embeddings(StrictModel):
    """The model that turns chunks and queries into vectors."""

    engine: EmbeddingEngine = Field(
        default="embedded",
        description="embedded: all-MiniLM-L6-v2 on onnxruntime in the gateway; upstream: an "
        "OpenAI-compatible /v1/embeddings (vLLM or llama.cpp) at url",
    )
    model: str = Field(
        default="all-minilm-l6-v2",
        min_length=1,
        max_length=256,
        description="the name /v1/embeddings answers to, and the upstream's model name",
    )
    source: str = Field(
        default="pkg:minilm/model.onnx",
        description="embedded: the ONNX file (pkg:, bundle: or file:)",
    )
    sha256: Sha256 | None = Field(
        default="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        description="embedded: the ONNX file's digest, checked before it loads",
    )
    tokenizer: str = Field(
        default="pkg:minilm/tokenizer.json",
        description="the tokenizer.json chunk sizes are counted with (and the embedded model uses)",
    )
    url: HttpUrl | None = Field(default=None, description="upstream: the base URL, ending in /v1")
    dimensions: int | None = Field(
        default=None, ge=1, le=16384, description="upstream: the vector size it answers with"
    )


class Chunking(StrictModel):
    size: int = Field(default=200, ge=16, le=254, description="tokens per chunk")
    overlap: int = Field(default=32, ge=0, description="tokens shared by neighbouring chunks")


class Retrieval(StrictModel):
    """Retrieval-augmented chat: grounding answers on the caller's readable documents."""

    chat: bool = Field(
        default=False,
        description="ground every chat completion; off: only requests that ask for it",
    )
    top_k: int = Field(default=4, ge=1, le=50, description="chunks put into the prompt")
    min_score: float = Field(
        default=0.25, ge=-1.0, le=1.0, description="cosine similarity a chunk needs to be used"
    )


class Memory(StrictModel):
    vector_store: VectorStore
    qdrant_url: HttpUrl | None = Field(default=None, description="required for qdrant")
    key_source: KeySource
    key_file: AbsolutePath | None = Field(default=None, description="required for key_source file")
    tpm_pcrs: list[int] = Field(
        default_factory=lambda: [7], description="PCRs the TPM-sealed key is bound to"
    )
    tpm_tcti: str = Field(
        default="device:/dev/tpmrm0",
        min_length=1,
        description="how tpm2-tools reach the TPM (a TCTI string)",
    )
    data_dir: AbsolutePath
    embeddings: Embeddings = Field(default_factory=Embeddings)
    chunking: Chunking = Field(default_factory=Chunking)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    max_document_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="the largest document /ingest accepts, before base64",
    )
    retention: Duration | None = Field(
        default=None, description="how long a document without its own retention is kept"
    )
    retention_interval: Duration = Field(
        default="1h", description="how often expired documents are crypto-shredded"
    )
    restricted_tags: dict[str, list[DnsLabel]] = Field(
        default_factory=dict,
        description=(
            "need-to-know tags: a document carrying one is readable only by these roles "
            "(and its owner), within their clearance"
        ),
    )


class ComplianceLock(StrictModel):
    """The signed manifest pinning models, policy and config; drift refuses every request."""

    required: bool = Field(description="refuse requests while no valid lock is in place")
    manifest: AbsolutePath = "/etc/sovereign/lock.json"
    public_key: AbsolutePath = Field(
        default="/etc/sovereign/lock.pub", description="Ed25519 public key (PEM) it is signed by"
    )


class Policy(StrictModel):
    bundle: str = Field(min_length=1, description="the Rego bundle directory or archive")
    engine: PolicyEngineKind = Field(
        description="embedded: regorus in the gateway process; remote: the OPA server at opa_url"
    )
    opa_url: HttpUrl = Field(description="where the gateway asks OPA for decisions")
    dlp: DlpMode
    lock: ComplianceLock


class Audit(StrictModel):
    path: AbsolutePath
    checkpoint_interval: Duration
    checkpoint_records: int = Field(
        default=1000, ge=1, description="also sign a checkpoint after this many records"
    )
    retention: Duration
    signing_key: AbsolutePath = Field(
        default="/var/lib/sovereign/keys/audit.key",
        description="Ed25519 private key (PEM) that signs checkpoints; created when missing",
    )
    capture_content: bool = Field(
        default=False, description="store prompts and answers in the audit log (off: digests only)"
    )


class Sandbox(StrictModel):
    runtime: SandboxRuntime


class GatewayTls(StrictModel):
    """TLS 1.3 on the client boundary: the operator's certificate, or a node-local CA."""

    certificate: AbsolutePath | None = Field(
        default=None, description="PEM certificate chain the gateway serves; with key"
    )
    key: AbsolutePath | None = Field(default=None, description="its private key (PEM)")
    local_ca: bool = Field(
        default=False,
        description="the gateway keeps a CA on the node and issues its own server certificate; "
        "clients trust ca_dir/ca.pem",
    )
    ca_dir: AbsolutePath = Field(
        default="/var/lib/sovereign/tls", description="local_ca: the CA and the server's keys"
    )
    names: list[HostName] = Field(
        default_factory=list,
        description="local_ca: DNS names and IP addresses the server certificate covers, besides "
        "the node's names, the listen address and localhost",
    )


class Gateway(StrictModel):
    listen: HostPort
    tls: GatewayTls | None = Field(
        default=None, description="TLS for clients; plain HTTP only on a loopback listen address"
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=104_857_600)
    upstream: HttpUrl | None = Field(
        default=None,
        description="an OpenAI-compatible server that answers for models without their own URL",
    )


class FederationPeer(StrictModel):
    name: DnsLabel
    url: HttpUrl
    public_key: str = Field(
        pattern=r"^[A-Za-z0-9_-]{43}$", description="Ed25519 public key, base64url, no padding"
    )


class Federation(StrictModel):
    peers: list[FederationPeer] = Field(default_factory=list)


class BundleWheels(StrictModel):
    """The Python wheels the node installs, pinned with hashes, from a connected index."""

    index: HttpUrl = Field(description="a PEP 691 or PEP 503 simple index")
    requirements: str = Field(
        min_length=1,
        description="a requirements file with every line pinned (==) and hashed, as "
        "`uv export` writes it; relative to the profile",
    )
    python: list[str] = Field(
        default_factory=lambda: ["3.11"], min_length=1, description="Python versions, 3.N"
    )
    platforms: list[str] = Field(
        default_factory=lambda: ["manylinux_2_36_x86_64"],
        min_length=1,
        description="wheel platform tags; manylinux_2_36 (Debian 12) takes older manylinux too",
    )


class BundleDebian(StrictModel):
    """The node image's Debian packages (its recipe's lists, with their dependencies and
    every Priority: required package) and any extra."""

    sources: list[str] = Field(
        default_factory=list,
        description="apt source lines, `deb URL SUITE COMPONENT...`; empty: the image recipe's",
    )
    keyring: str = Field(
        default="/usr/share/keyrings/debian-archive-keyring.gpg",
        description="the keyring gpgv checks each suite's InRelease against",
    )
    packages: list[str] = Field(
        default_factory=list, description="packages beyond the image recipe's own lists"
    )


class BundleModels(StrictModel):
    endpoint: HttpUrl = Field(
        default=HttpUrl("https://huggingface.co"), description="a Hugging Face-compatible file API"
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="for each model whose source is bundle:<path>, where the bundle gets it: "
        "hf:<org>/<repo>@<40-hex commit> or file:/<path>",
    )


class BundleSpec(StrictModel):
    """What `sovereign bundle create` fetches, on the connected side, for this node."""

    wheels: BundleWheels | None = None
    images: list[str] = Field(
        default_factory=list,
        description="container images, registry/repository:tag or @sha256:<digest>",
    )
    platforms: list[str] = Field(
        default_factory=lambda: ["linux/amd64"], min_length=1, description="for the images"
    )
    debian: BundleDebian | None = None
    models: BundleModels = Field(default_factory=BundleModels)


# An image in the air-gap registry, pinned by digest: repository@sha256:<64 hex>.
ImageDigest = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*@sha256:[0-9a-f]{64}$",
        examples=["sovereign/gateway@sha256:" + "0" * 64],
    ),
]
# A Kubernetes resource quantity with a binary suffix: 500Mi, 20Gi, 2Ti.
Quantity = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,5}(Mi|Gi|Ti)$", examples=["20Gi"])]
# A five-field cron schedule, as a CronJob takes it.
CronSchedule = Annotated[str, Field(pattern=r"^(\S+\s+){4}\S+$", examples=["15 2 * * *"])]


class ClusterImages(StrictModel):
    """Every image the datacenter stack runs, by digest, relative to the air-gap registry."""

    gateway: ImageDigest
    keycloak: ImageDigest
    postgres: ImageDigest
    opa: ImageDigest
    spire_server: ImageDigest
    spire_agent: ImageDigest
    spire_controller_manager: ImageDigest
    spiffe_csi_driver: ImageDigest
    csi_node_driver_registrar: ImageDigest
    qdrant: ImageDigest
    vllm: ImageDigest
    snapshot: ImageDigest = Field(description="a curl image the Qdrant snapshot job runs")


class ClusterIngress(StrictModel):
    host: HostName = Field(description="the gateway's public host name")
    tls_secret: DnsLabel = Field(description="the kubernetes.io/tls Secret holding its certificate")
    class_name: DnsLabel | None = Field(default=None, description="the IngressClass to use")
    controller_namespace: DnsLabel = Field(
        default="ingress-nginx",
        description="the namespace of the ingress controller, the only source of outside traffic",
    )
    identity_tls_secret: DnsLabel = Field(
        default="keycloak-tls",
        description="the kubernetes.io/tls Secret for the issuer's host, served by Keycloak itself",
    )


class ClusterGateway(StrictModel):
    replicas: int = Field(default=2, ge=2, le=64, description="the fewest gateway pods")
    max_replicas: int = Field(default=8, ge=2, le=256, description="the HPA's ceiling")
    cpu_utilization: int = Field(
        default=70, ge=10, le=95, description="the CPU percentage the HPA scales at"
    )
    data_storage: Quantity = Field(
        default="50Gi", description="the ReadWriteMany volume for audit logs and sealed memory"
    )
    data_storage_class: str | None = Field(
        default=None, description="a ReadWriteMany storage class; the cluster's default if unset"
    )
    models_claim: DnsLabel = Field(
        default="sovereign-gateway-models",
        description="the ReadOnlyMany PersistentVolumeClaim in sovereign-gateway holding the "
        "imported bundle's embedding model and tokenizer, mounted at the bundle root",
    )


class ClusterQdrant(StrictModel):
    replicas: int = Field(default=1, ge=1, le=16)
    storage: Quantity = "100Gi"
    snapshot_schedule: CronSchedule = Field(
        default="15 2 * * *", description="when the snapshot CronJob runs"
    )


class Cluster(StrictModel):
    """The existing Kubernetes cluster a datacenter profile deploys onto with Pulumi."""

    stack: DnsLabel = Field(default="datacenter", description="the Pulumi stack name")
    registry: HostPort = Field(description="the air-gap OCI registry every image comes from")
    images: ClusterImages
    storage_class: DnsLabel = Field(description="the StorageClass of every ReadWriteOnce volume")
    ingress: ClusterIngress
    trust_domain: HostName = Field(description="the SPIFFE trust domain of the cluster")
    api_server_cidrs: list[Cidr] = Field(
        min_length=1, description="where the Kubernetes API server listens (SPIRE talks to it)"
    )
    node_cidrs: list[Cidr] = Field(
        min_length=1, description="the nodes' addresses (SPIRE agents ask their kubelet)"
    )
    gpu_runtime: SandboxRuntime | None = Field(
        default=None,
        description="the RuntimeClass of GPU pods; sandbox.runtime if unset. runc only when "
        "named here",
    )
    gpu_runtime_class: DnsLabel | None = Field(
        default=None,
        description="an existing RuntimeClass for sandboxed GPU pods (the GPU operator's "
        "kata-qemu-nvidia-gpu); the stack's own gvisor or kata class if unset",
    )
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^[a-z0-9.-]+/[A-Za-z0-9_.-]+$",
        description="the extended resource GPU pods request: nvidia.com/gpu, or nvidia.com/pgpu "
        "for passthrough into Kata guests",
    )
    models_claim: DnsLabel = Field(
        default="sovereign-models",
        description="the ReadOnlyMany PersistentVolumeClaim in sovereign-runtime holding the "
        "imported model bundle",
    )
    keycloak_database_storage: Quantity = "20Gi"
    spire_storage: Quantity = "1Gi"
    gateway: ClusterGateway = Field(default_factory=ClusterGateway)
    qdrant: ClusterQdrant = Field(default_factory=ClusterQdrant)


class Profile(StrictModel):
    """A SovereignStack node profile, resolved with the defaults of its kind."""

    model_config = ConfigDict(title="SovereignStack node profile")

    version: Literal[1] = 1
    kind: Kind
    name: DnsLabel
    nodes: list[Node] = Field(min_length=1)
    host: Host
    network: Network
    mirrors: list[Mirror] = Field(default_factory=list)
    identity: Identity
    models: list[ModelSpec] = Field(min_length=1)
    memory: Memory
    policy: Policy
    audit: Audit
    sandbox: Sandbox
    gateway: Gateway
    federation: Federation
    bundle: BundleSpec | None = Field(
        default=None, description="what the air-gap bundle for this node holds, and from where"
    )
    cluster: Cluster | None = Field(
        default=None, description="datacenter only: the Kubernetes cluster `pulumi up` targets"
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in defaults.KINDS:
            return defaults.merge(defaults.for_kind(data["kind"]), data)
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> Profile:
        found = violations(self)
        if found:
            raise PydanticCustomError(
                "profile_rule",
                "{summary}",
                {"summary": "; ".join(v.message for v in found), "violations": tuple(found)},
            )
        return self
