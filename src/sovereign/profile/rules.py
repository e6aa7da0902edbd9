"""Cross-field rules of a node profile.

Takes a field-valid `Profile`; gives every rule it breaks as a `Violation` whose `loc`
points at the field to change, so errors name a line in the user's file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from sovereign.mirror.fetch import MirrorError
from sovereign.mirror.oci import Platform, parse_reference
from sovereign.mirror.pypi import Target
from sovereign.profile.derived import dns_label, local_weights_path
from sovereign.profile.types import duration_seconds, is_cidr, split_host_port

if TYPE_CHECKING:
    from pydantic import HttpUrl

    from sovereign.profile.model import Profile

Loc = tuple[str | int, ...]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ARTIFACT_SCHEMES = ("pkg", "bundle", "file", "hf")
# vLLM's 4-bit checkpoint formats; int4 names a GGUF file, which only llama.cpp loads.
VLLM_4BIT_FORMATS = ("awq", "gptq", "compressed-tensors", "bitsandbytes")
LLAMACPP_QUANTIZATIONS = ("int4", "none")
# Kinds whose data and compute must be locked down: no unsandboxed compute, no log-only DLP.
LOCKED_DOWN_KINDS = ("air-gapped", "datacenter")


class Violation(NamedTuple):
    loc: Loc
    message: str


def violations(profile: Profile) -> list[Violation]:
    checks = (
        _nodes,
        _models,
        _vllm,
        _serving,
        _keys,
        _memory_backends,
        _identity,
        _tls,
        _mesh,
        _egress_names,
        _air_gapped_egress,
        _locked_down,
        _audit,
        _federation,
        _bundle,
        _cluster,
    )
    return [violation for check in checks for violation in check(profile)]


def _duplicates(names: list[str]) -> Iterator[int]:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            yield index
        seen.add(name)


def _nodes(profile: Profile) -> Iterator[Violation]:
    names = [node.name for node in profile.nodes]
    for index in _duplicates(names):
        yield Violation(("nodes", index, "name"), f"node name {names[index]!r} is used twice")
    if profile.kind == "personal" and len(profile.nodes) != 1:
        yield Violation(
            ("nodes",), f"a personal profile has exactly one node, found {len(profile.nodes)}"
        )
    for index, node in enumerate(profile.nodes):
        if node.gpu == "apple" and node.arch != "arm64":
            yield Violation(("nodes", index, "gpu"), "an apple GPU needs arch arm64")
        if node.gpu == "none" and node.gpu_count != 1:
            yield Violation(
                ("nodes", index, "gpu_count"),
                f"node {node.name!r} has gpu: none, so gpu_count {node.gpu_count} counts nothing",
            )


def _models(profile: Profile) -> Iterator[Violation]:
    seen: dict[str, str] = {}
    nvidia_nodes = [node.name for node in profile.nodes if node.gpu == "nvidia"]
    for index, model in enumerate(profile.models):
        labelled: list[tuple[Loc, str]] = [(("models", index, "name"), model.name)]
        labelled += [
            (("models", index, "aliases", position), alias)
            for position, alias in enumerate(model.aliases)
        ]
        for loc, label in labelled:
            if label in seen:
                yield Violation(
                    loc, f"{label!r} is already the name or an alias of model {seen[label]!r}"
                )
            else:
                seen[label] = model.name

        if model.engine == "vllm" and not nvidia_nodes:
            yield Violation(
                ("models", index, "engine"),
                f"model {model.name!r} uses vllm, which needs a node with gpu: nvidia; "
                "no node has one",
            )
        if model.engine == "llamacpp" and model.quantization not in LLAMACPP_QUANTIZATIONS:
            yield Violation(
                ("models", index, "quantization"),
                f"llama.cpp cannot load {model.quantization} weights; use int4 (GGUF) or none",
            )
        scheme = model.source.partition(":")[0]
        if model.engine == "upstream" and scheme not in ("http", "https"):
            yield Violation(
                ("models", index, "source"),
                "an upstream model's source is the OpenAI-compatible base URL (http or https)",
            )
        if model.engine != "upstream" and scheme not in ARTIFACT_SCHEMES:
            yield Violation(
                ("models", index, "source"),
                f"expected a weights URI with scheme {', '.join(ARTIFACT_SCHEMES)}; "
                f"got {model.source!r}",
            )
        if profile.kind in LOCKED_DOWN_KINDS and model.sha256 is None:
            yield Violation(
                ("models", index, "sha256"),
                f"kind {profile.kind} requires the sha256 of every model's weights",
            )
        for position, role in enumerate(model.allowed_roles):
            if role not in profile.identity.roles:
                yield Violation(
                    ("models", index, "allowed_roles", position),
                    f"role {role!r} is not defined in identity.roles "
                    f"({', '.join(sorted(profile.identity.roles))})",
                )


def _vllm(profile: Profile) -> Iterator[Violation]:
    # Imported here: the model module imports this one.
    from sovereign.profile.model import VllmSettings

    most_gpus = max((node.gpu_count for node in profile.nodes if node.gpu == "nvidia"), default=0)
    gateway_port = split_host_port(profile.gateway.listen)[1]
    ports: dict[int, str] = {}
    services: dict[str, str] = {}
    for index, model in enumerate(profile.models):
        at: Loc = ("models", index)
        if model.engine != "vllm":
            if model.vllm is not None:
                yield Violation(
                    (*at, "vllm"),
                    f"vllm settings apply only to engine vllm; model {model.name!r} uses "
                    f"{model.engine}",
                )
            continue
        if model.quantization == "int4":
            yield Violation(
                (*at, "quantization"),
                "int4 is a GGUF file for llama.cpp; for vllm name the 4-bit format: "
                f"{', '.join(VLLM_4BIT_FORMATS[:-1])} or {VLLM_4BIT_FORMATS[-1]}",
            )
        # Other schemes are already refused by _models.
        if model.source.partition(":")[0] in ARTIFACT_SCHEMES:
            try:
                local_weights_path(model.source)
            except ValueError as exc:
                yield Violation((*at, "source"), str(exc))
        settings = model.vllm if model.vllm is not None else VllmSettings()
        tp = settings.tensor_parallel_size
        if most_gpus and tp > most_gpus:
            yield Violation(
                (*at, "vllm", "tensor_parallel_size"),
                f"tensor_parallel_size {tp} needs {tp} GPUs on one node; the most any "
                f"nvidia node has is gpu_count {most_gpus}",
            )
        if settings.max_model_len is not None and settings.max_model_len > model.context_length:
            yield Violation(
                (*at, "vllm", "max_model_len"),
                f"max_model_len {settings.max_model_len} is longer than the model's "
                f"context_length {model.context_length}",
            )
        if profile.kind == "datacenter":
            # Each model gets its own Service, named after the model.
            service = dns_label("vllm", model.name)
            if service in services:
                yield Violation(
                    (*at, "name"),
                    f"model {model.name!r} would get the vLLM service name {service!r} of "
                    f"model {services[service]!r}; rename one",
                )
            services.setdefault(service, model.name)
            continue
        # Elsewhere vLLM shares the node with the gateway and the other vllm models.
        port = settings.port
        if port == gateway_port:
            yield Violation(
                (*at, "vllm", "port"),
                f"vllm port {port} is the gateway's port ({profile.gateway.listen}); "
                "set vllm.port to a free port",
            )
        elif port in ports:
            yield Violation(
                (*at, "vllm", "port"),
                f"vllm port {port} is already taken by model {ports[port]!r}",
            )
        ports.setdefault(port, model.name)


def _serving(profile: Profile) -> Iterator[Violation]:
    from sovereign.profile.model import VllmSettings

    for index, model in enumerate(profile.models):
        at: Loc = ("models", index)
        embedded = model.engine == "llamacpp" and not model.replicas
        if model.engine == "vllm" and not model.replicas and profile.kind != "datacenter":
            yield Violation(
                (*at, "replicas"),
                f"model {model.name!r} uses vllm, which runs beside the gateway, not in it; "
                f"list its server (e.g. http://127.0.0.1:{(model.vllm or VllmSettings()).port}/v1)",
            )
        serving = model.serving
        if embedded and serving.concurrency not in (None, 1):
            yield Violation(
                (*at, "serving", "concurrency"),
                "the embedded llama.cpp engine runs one request per worker; raise "
                "serving.workers instead",
            )
        if not embedded:
            # Compared with the defaults, not "was it set": a resolved profile sets everything.
            for field, default in (("workers", 1), ("threads", None)):
                if getattr(serving, field) != default:
                    yield Violation(
                        (*at, "serving", field),
                        f"serving.{field} applies only to the embedded llama.cpp engine "
                        "(engine llamacpp without replicas)",
                    )


def _keys(profile: Profile) -> Iterator[Violation]:
    required = [node.name for node in profile.nodes if node.tpm == "required"]
    # On a cluster the TPMs seal the nodes' disks; gateway pods take their key from a Secret.
    if required and profile.memory.key_source != "tpm" and profile.cluster is None:
        yield Violation(
            ("memory", "key_source"),
            f"node {required[0]!r} requires a TPM, so the key source must be tpm, "
            f"not {profile.memory.key_source}",
        )
    if profile.memory.key_source == "tpm":
        for index, node in enumerate(profile.nodes):
            if node.tpm == "none":
                yield Violation(
                    ("nodes", index, "tpm"),
                    f"memory.key_source is tpm but node {node.name!r} has no TPM",
                )
    for position, pcr in enumerate(profile.memory.tpm_pcrs):
        if not 0 <= pcr <= 23:
            yield Violation(("memory", "tpm_pcrs", position), f"PCR {pcr} is not in 0..23")
    if len(set(profile.memory.tpm_pcrs)) != len(profile.memory.tpm_pcrs):
        yield Violation(("memory", "tpm_pcrs"), "a PCR is listed twice")


def _memory_backends(profile: Profile) -> Iterator[Violation]:
    memory = profile.memory
    if memory.vector_store == "qdrant" and memory.qdrant_url is None:
        yield Violation(("memory", "qdrant_url"), "vector_store qdrant needs qdrant_url")
    if memory.vector_store == "embedded" and memory.qdrant_url is not None:
        yield Violation(
            ("memory", "qdrant_url"), "qdrant_url is only used with vector_store qdrant"
        )
    if memory.key_source == "file" and memory.key_file is None:
        yield Violation(("memory", "key_file"), "key_source file needs key_file")
    if memory.key_source != "file" and memory.key_file is not None:
        yield Violation(("memory", "key_file"), "key_file is only used with key_source file")
    embeddings = memory.embeddings
    if embeddings.engine == "upstream":
        if embeddings.url is None:
            yield Violation(("memory", "embeddings", "url"), "engine upstream needs url")
        if embeddings.dimensions is None:
            yield Violation(
                ("memory", "embeddings", "dimensions"),
                "engine upstream needs dimensions (the vector size the store is built for)",
            )
    else:
        if embeddings.url is not None:
            yield Violation(
                ("memory", "embeddings", "url"), "url is only used with engine upstream"
            )
        if embeddings.sha256 is None:
            yield Violation(
                ("memory", "embeddings", "sha256"),
                "the embedded model's digest is needed: it is checked before the model loads",
            )
    if memory.chunking.overlap >= memory.chunking.size:
        yield Violation(
            ("memory", "chunking", "overlap"),
            f"overlap {memory.chunking.overlap} must be below size {memory.chunking.size}",
        )
    for tag, roles in memory.restricted_tags.items():
        for position, role in enumerate(roles):
            if role not in profile.identity.roles:
                yield Violation(
                    ("memory", "restricted_tags", tag, position),
                    f"role {role!r} is not in identity.roles ({', '.join(profile.identity.roles)})",
                )


def _is_loopback(url: HttpUrl) -> bool:
    try:
        return ipaddress.ip_address(url.host or "").is_loopback
    except ValueError:
        return url.host == "localhost"


def _identity(profile: Profile) -> Iterator[Violation]:
    identity = profile.identity
    issuer = identity.issuer
    granted: list[tuple[str, int, list[str]]] = [
        ("users", index, user.roles) for index, user in enumerate(identity.users)
    ] + [
        ("service_clients", index, client.roles)
        for index, client in enumerate(identity.service_clients)
    ]
    for field, index, roles in granted:
        for role_index, role in enumerate(roles):
            if role not in identity.roles:
                yield Violation(
                    ("identity", field, index, "roles", role_index),
                    f"role {role!r} is not in identity.roles ({', '.join(identity.roles)})",
                )
    for role in identity.clearances:
        if role not in identity.roles:
            yield Violation(
                ("identity", "clearances", role),
                f"role {role!r} is not in identity.roles ({', '.join(identity.roles)})",
            )
    names = [user.name for user in identity.users]
    for index in _duplicates(names):
        yield Violation(
            ("identity", "users", index, "name"), f"user {names[index]!r} is listed twice"
        )
    if identity.provider == "local":
        if profile.kind != "personal":
            yield Violation(
                ("identity", "provider"),
                f"the local issuer is for personal nodes only; kind {profile.kind} uses keycloak",
            )
        if not _is_loopback(issuer):
            yield Violation(("identity", "issuer"), "a local issuer must be a loopback URL")
        return
    expected_suffix = f"/realms/{identity.realm}"
    if not (issuer.path or "").rstrip("/").endswith(expected_suffix):
        yield Violation(
            ("identity", "issuer"),
            f"a Keycloak issuer ends in {expected_suffix} for realm "
            f"{profile.identity.realm!r}; got {str(issuer)!r}",
        )
    if issuer.scheme != "https" and not _is_loopback(issuer):
        yield Violation(
            ("identity", "issuer"), "the issuer must use https unless it is on loopback"
        )


def _tls(profile: Profile) -> Iterator[Violation]:
    """TLS 1.3 on the client boundary: plain HTTP only on loopback, and never on the kinds
    whose clients come over a network (air-gapped), or behind the Ingress (datacenter)."""
    tls = profile.gateway.tls
    if profile.kind == "datacenter":
        if tls is not None:
            yield Violation(
                ("gateway", "tls"),
                "on a cluster the Ingress terminates TLS with cluster.ingress.tls_secret; "
                "leave gateway.tls out",
            )
        return
    if tls is None:
        host = split_host_port(profile.gateway.listen)[0]
        if profile.kind == "air-gapped":
            yield Violation(
                ("gateway", "tls"),
                "kind air-gapped serves clients over TLS only: set certificate and key, or "
                "local_ca: true",
            )
        elif not _is_loopback_host(host):
            yield Violation(
                ("gateway", "listen"),
                f"{profile.gateway.listen} is not a loopback address: plain HTTP is allowed only "
                "on loopback; set gateway.tls (certificate and key, or local_ca: true)",
            )
        return
    given = (tls.certificate is not None, tls.key is not None)
    if given[0] != given[1]:
        missing = "key" if given[0] else "certificate"
        yield Violation(("gateway", "tls", missing), f"{missing} is required with the other")
    elif tls.local_ca and given[0]:
        yield Violation(
            ("gateway", "tls", "local_ca"),
            "local_ca makes its own certificate: give certificate and key, or local_ca, not both",
        )
    elif not tls.local_ca and not given[0]:
        yield Violation(
            ("gateway", "tls"), "set certificate and key (PEM files), or local_ca: true"
        )
    if tls.names and not tls.local_ca:
        yield Violation(
            ("gateway", "tls", "names"), "names are for local_ca; your certificate names itself"
        )


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _mesh(profile: Profile) -> Iterator[Violation]:
    mesh = profile.network.mesh
    if mesh.enabled and mesh.address is None:
        yield Violation(("network", "mesh", "address"), "an enabled mesh needs this node's address")
    if not mesh.enabled and mesh.peers:
        yield Violation(("network", "mesh", "peers"), "peers are listed but the mesh is disabled")
    names = [peer.name for peer in mesh.peers]
    for index in _duplicates(names):
        yield Violation(
            ("network", "mesh", "peers", index, "name"), f"peer {names[index]!r} is listed twice"
        )
    keys = [peer.public_key for peer in mesh.peers]
    for index in _duplicates(keys):
        yield Violation(
            ("network", "mesh", "peers", index, "public_key"), "two peers share this public key"
        )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _egress_names(profile: Profile) -> Iterator[Violation]:
    """Firewall rules hold addresses: every name they use must be in `network.hosts`."""
    known = profile.network.hosts
    for index, rule in enumerate(profile.network.egress.allow):
        if is_cidr(rule.to):
            continue
        host, _ = split_host_port(rule.to)
        if not _is_address(host) and host not in known:
            yield Violation(
                ("network", "egress", "allow", index, "to"),
                f"{host!r} is a name, and the egress firewall needs its address: add "
                f"`{host}: <address>` under network.hosts",
            )
    for index, peer in enumerate(profile.network.mesh.peers):
        if peer.endpoint is None:
            continue
        host, _ = split_host_port(peer.endpoint)
        if not _is_address(host) and host not in known:
            yield Violation(
                ("network", "mesh", "peers", index, "endpoint"),
                f"{host!r} is a name, and the egress firewall needs its address: add "
                f"`{host}: <address>` under network.hosts",
            )


def mesh_networks(profile: Profile) -> list[IPNetwork]:
    mesh = profile.network.mesh
    if not mesh.enabled:
        return []
    networks: list[IPNetwork] = []
    if mesh.address is not None:
        networks.append(ipaddress.ip_interface(mesh.address).network)
    networks += [ipaddress.ip_network(ip) for peer in mesh.peers for ip in peer.allowed_ips]
    return networks


def mirror_endpoints(profile: Profile) -> set[tuple[str, int]]:
    endpoints: set[tuple[str, int]] = set()
    for mirror in profile.mirrors:
        parts = urlsplit(str(mirror.url))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        endpoints.add(((parts.hostname or "").lower(), port))
    return endpoints


def _in_networks(address: str, networks: list[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def _air_gapped_egress(profile: Profile) -> Iterator[Violation]:
    if profile.kind != "air-gapped":
        return
    networks = mesh_networks(profile)
    mirrors = mirror_endpoints(profile)
    peers = {
        split_host_port(peer.endpoint)
        for peer in profile.network.mesh.peers
        if peer.endpoint is not None
    }
    allowed_text = (
        f"the mesh ({', '.join(map(str, networks)) or 'disabled'}) and the local mirrors "
        f"({', '.join(f'{h}:{p}' for h, p in sorted(mirrors)) or 'none declared'})"
    )
    for index, rule in enumerate(profile.network.egress.allow):
        if is_cidr(rule.to):
            net = ipaddress.ip_network(rule.to)
            inside = any(
                net.version == mesh.version and net.subnet_of(mesh)  # type: ignore[arg-type]
                for mesh in networks
            )
        else:
            host, port = split_host_port(rule.to)
            inside = (
                (host, port) in mirrors or (host, port) in peers or _in_networks(host, networks)
            )
        if not inside:
            yield Violation(
                ("network", "egress", "allow", index, "to"),
                f"kind air-gapped allows egress only to {allowed_text}; {rule.to!r} is neither",
            )


def _locked_down(profile: Profile) -> Iterator[Violation]:
    if profile.kind not in LOCKED_DOWN_KINDS:
        return
    if profile.sandbox.runtime == "runc":
        yield Violation(
            ("sandbox", "runtime"),
            f"kind {profile.kind} runs compute sandboxed: use gvisor or kata, not runc",
        )
    if profile.policy.dlp == "log":
        yield Violation(
            ("policy", "dlp"),
            f"kind {profile.kind} must block or redact on a DLP match, not only log it",
        )


def _audit(profile: Profile) -> Iterator[Violation]:
    audit = profile.audit
    if duration_seconds(audit.retention) < duration_seconds(audit.checkpoint_interval):
        yield Violation(
            ("audit", "retention"),
            f"retention {audit.retention} is shorter than the checkpoint interval "
            f"{audit.checkpoint_interval}",
        )


def _federation(profile: Profile) -> Iterator[Violation]:
    names = [peer.name for peer in profile.federation.peers]
    for index in _duplicates(names):
        yield Violation(
            ("federation", "peers", index, "name"),
            f"federation peer {names[index]!r} is listed twice",
        )


def _bundle(profile: Profile) -> Iterator[Violation]:
    if profile.bundle is None:
        return
    sources = profile.bundle.models.sources
    names = [model.name for model in profile.models]
    for index, model in enumerate(profile.models):
        if model.source.startswith("bundle:") and model.name not in sources:
            yield Violation(
                ("models", index, "source"),
                f"{model.source} is fetched into the bundle; give its origin in "
                f"bundle.models.sources.{model.name} (hf:<org>/<repo>@<commit> or file:/<path>)",
            )
    for name, origin in sources.items():
        if name not in names:
            yield Violation(
                ("bundle", "models", "sources", name), f"no model named {name!r} in models"
            )
        elif not (_HF_ORIGIN.fullmatch(origin) or _FILE_ORIGIN.fullmatch(origin)):
            yield Violation(
                ("bundle", "models", "sources", name),
                f"{origin!r}: expected hf:<org>/<repo>@<40-hex commit> (a branch moves; a "
                "commit does not) or file:/<path>",
            )
    wheels = profile.bundle.wheels
    for index, python in enumerate(wheels.python if wheels else []):
        if not re.fullmatch(r"3\.\d+", python):
            yield Violation(("bundle", "wheels", "python", index), f"{python!r}: expected 3.N")
    for index, platform in enumerate(wheels.platforms if wheels else []):
        try:
            Target.parse("3.11", platform)
        except MirrorError as error:
            yield Violation(("bundle", "wheels", "platforms", index), str(error))
    for index, ref in enumerate(profile.bundle.images):
        try:
            parse_reference(ref)
        except MirrorError as error:
            yield Violation(("bundle", "images", index), str(error))
    for index, platform in enumerate(profile.bundle.platforms):
        try:
            Platform.parse(platform)
        except MirrorError as error:
            yield Violation(("bundle", "platforms", index), str(error))


_HF_ORIGIN = re.compile(r"hf:[\w.-]+/[\w.-]+@[0-9a-f]{40}")
_FILE_ORIGIN = re.compile(r"file:/.+")


def _cluster(profile: Profile) -> Iterator[Violation]:
    cluster = profile.cluster
    if cluster is None:
        return
    if profile.kind != "datacenter":
        yield Violation(("cluster",), f"cluster is for kind datacenter, not {profile.kind}")
        return
    if cluster.gateway.max_replicas < cluster.gateway.replicas:
        yield Violation(
            ("cluster", "gateway", "max_replicas"),
            f"max_replicas {cluster.gateway.max_replicas} is below replicas "
            f"{cluster.gateway.replicas}",
        )
    registries = [
        urlsplit(str(mirror.url)).netloc for mirror in profile.mirrors if mirror.kind == "oci"
    ]
    if cluster.registry not in registries:
        named = ", ".join(registries) or "none"
        yield Violation(
            ("cluster", "registry"),
            f"registry {cluster.registry} is not one of the profile's oci mirrors ({named}); "
            "list it under mirrors with kind oci",
        )
    # pkg: resolves into the rendering machine's tools cache and file: into a node's disk;
    # pods see only the bundle volumes mounted at the bundle root.
    sources: list[tuple[Loc, str]] = [
        (("models", index, "source"), model.source)
        for index, model in enumerate(profile.models)
        if model.engine != "upstream"
    ]
    embeddings = profile.memory.embeddings
    if embeddings.engine == "embedded":
        sources.append((("memory", "embeddings", "source"), embeddings.source))
    sources.append((("memory", "embeddings", "tokenizer"), embeddings.tokenizer))
    for loc, source in sources:
        scheme = source.partition(":")[0]
        if scheme not in ("bundle", "hf"):
            yield Violation(
                loc,
                f"{source!r}: pods load weights from the imported bundle's volume; use a "
                f"bundle: or hf: source on a cluster, not {scheme}:",
            )
    yield from _gpu_runtime(profile)
    if profile.memory.key_source == "tpm":
        yield Violation(
            ("memory", "key_source"),
            "a gateway pod cannot reach a node's TPM: use key_source passphrase (a Secret) "
            "or file on a cluster",
        )


def _gpu_runtime(profile: Profile) -> Iterator[Violation]:
    cluster = profile.cluster
    if cluster is None or not any(model.engine == "vllm" for model in profile.models):
        return
    runtime = cluster.gpu_runtime or profile.sandbox.runtime
    named = "cluster.gpu_runtime" if cluster.gpu_runtime else "sandbox.runtime"
    loc: Loc = ("cluster", "gpu_runtime_class")
    if runtime == "kata" and cluster.gpu_runtime_class is None:
        # A plain Kata guest sees no GPU the device plugin hands out; the GPU operator's
        # sandbox workloads pass one through under a RuntimeClass of their own.
        yield Violation(
            loc,
            f"GPU pods run under kata ({named}), which passes no GPU into its guest: name "
            "the GPU operator's RuntimeClass here (kata-qemu-nvidia-gpu, with gpu_resource "
            "nvidia.com/pgpu), or set cluster.gpu_runtime to gvisor",
        )
    if runtime != "kata" and cluster.gpu_runtime_class is not None:
        yield Violation(
            loc,
            f"GPU pods run under {runtime} ({named}); gpu_runtime_class names a Kata "
            "class for GPU passthrough and applies only with kata",
        )
