"""Every class of bad profile is refused with exit 2 and `file:line:col: error: field: why`."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sovereign.cli import app

LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<path>\S+): (?P<why>.+)$")
SHA = "a" * 64


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    line: int
    path: str
    why: str
    column: int | None = None


def personal(extra: str) -> str:
    return "kind: personal\nname: t\n" + extra


def air_gapped(extra: str) -> str:
    return "kind: air-gapped\nname: t\n" + extra


SYNTAX_AND_SHAPE = [
    Case("yaml-syntax", "kind: personal\nname: [t\n", 3, "<yaml>", "YAML syntax error"),
    Case("yaml-duplicate-key", "kind: personal\nname: a\nname: b\n", 3, "<yaml>", "duplicate key"),
    Case("yaml-tab", "kind: personal\n\tname: t\n", 2, "<yaml>", "YAML syntax error"),
    Case("empty-file", "", 1, "<profile>", "the profile is empty"),
    Case("not-a-mapping", "- kind: personal\n", 1, "<profile>", "expected a mapping"),
    Case("missing-kind", "name: t\n", 1, "kind", "missing required field 'kind'"),
    Case(
        "bad-kind",
        "name: t\nkind: laptop\n",
        2,
        "kind",
        "expected one of personal, edge, air-gapped, datacenter; got 'laptop'",
        column=7,
    ),
    Case(
        "missing-name",
        "kind: personal\n",
        1,
        "name",
        "missing required field 'name'",
    ),
]

FIELDS = [
    Case(
        "unknown-top-level-field",
        personal("nodez: []\n"),
        3,
        "nodez",
        "unknown field 'nodez'; expected one of: version, kind, name, nodes",
        column=1,
    ),
    Case(
        "unknown-nested-field",
        personal("nodes:\n  - name: a\n    gpus: 2\n"),
        5,
        "nodes[0].gpus",
        "unknown field 'gpus'; expected one of: name, role, arch, gpu, tpm",
        column=5,
    ),
    Case(
        "string-for-integer",
        personal("network:\n  mesh:\n    listen_port: '51820'\n"),
        5,
        "network.mesh.listen_port",
        "Input should be a valid integer; got str '51820'",
        column=18,
    ),
    Case(
        "yaml-1.2-yes-is-not-a-boolean",
        personal("network:\n  mesh:\n    enabled: yes\n"),
        5,
        "network.mesh.enabled",
        "valid boolean; got str 'yes'",
    ),
    Case(
        "bad-choice",
        personal("nodes:\n  - name: a\n    arch: x86\n"),
        5,
        "nodes[0].arch",
        "Input should be 'amd64' or 'arm64'; got str 'x86'",
    ),
    Case(
        "mapping-for-list",
        personal("nodes:\n  name: a\n"),
        4,
        "nodes",
        "Input should be a valid list; got a mapping",
    ),
    Case(
        "egress-default-allow",
        personal("network:\n  egress:\n    default: allow\n"),
        5,
        "network.egress.default",
        "Input should be 'deny'",
    ),
    Case(
        "cidr-with-host-bits",
        personal(
            "network:\n  egress:\n    allow:\n      - to: 10.0.0.1/8\n        description: x\n"
        ),
        6,
        "network.egress.allow[0].to",
        "expected a CIDR network such as 10.0.0.0/8: 10.0.0.1/8 has host bits set",
    ),
    Case(
        "port-out-of-range",
        personal(
            "network:\n  egress:\n    allow:\n      - to: mirror:99999\n        description: x\n"
        ),
        6,
        "network.egress.allow[0].to",
        "port must be a number from 1 to 65535, got '99999'",
    ),
    Case(
        "bad-duration",
        personal("audit:\n  retention: 90 days\n"),
        4,
        "audit.retention",
        "expected a duration like 30s, 15m, 24h, 90d, 2w or 7y, got '90 days'",
    ),
    Case(
        "bad-sha256",
        personal(
            "models:\n  - name: m\n    engine: llamacpp\n    source: pkg:m/m.gguf\n"
            "    sha256: ABC\n    context_length: 2048\n    allowed_roles: [user]\n"
        ),
        7,
        "models[0].sha256",
        "String should match pattern '^[0-9a-f]{64}$'",
    ),
    Case(
        "missing-required-in-list-item",
        personal("models:\n  - name: m\n    source: pkg:m/m.gguf\n"),
        4,
        "models[0].engine",
        "missing required field 'engine'",
    ),
]


def model(extra: str = "", engine: str = "llamacpp", source: str = "pkg:m/m.gguf") -> str:
    return (
        f"models:\n  - name: m\n    engine: {engine}\n    source: {source}\n"
        f"    context_length: 2048\n    allowed_roles: [user]\n{extra}"
    )


def datacenter(extra: str) -> str:
    return "kind: datacenter\nname: t\n" + extra


def vllm_model(extra: str = "", source: str = "bundle:models/m") -> str:
    """A vllm model `m` (lines 4-9; extra lines from 10)."""
    return model(f"    sha256: {SHA}\n{extra}", engine="vllm", source=source)


RULES = [
    Case(
        "air-gapped-egress-to-the-internet",
        air_gapped(
            "network:\n  egress:\n    allow:\n      - to: pypi.org:443\n        description: x\n"
        ),
        6,
        "network.egress.allow[0].to",
        "kind air-gapped allows egress only to the mesh (10.88.0.0/24) and the local mirrors "
        "(none declared); 'pypi.org:443' is neither",
    ),
    Case(
        "air-gapped-egress-to-a-cidr-outside-the-mesh",
        air_gapped(
            "network:\n  egress:\n    allow:\n      - to: 10.0.0.0/8\n        description: x\n"
        ),
        6,
        "network.egress.allow[0].to",
        "'10.0.0.0/8' is neither",
    ),
    Case(
        "tpm-required-with-file-keys",
        personal("nodes:\n  - name: a\n    tpm: required\nmemory:\n  key_source: file\n"),
        7,
        "memory.key_source",
        "node 'a' requires a TPM, so the key source must be tpm, not file",
    ),
    Case(
        "tpm-keys-on-a-node-without-tpm",
        air_gapped("nodes:\n  - name: a\n    tpm: none\n    gpu: nvidia\n"),
        5,
        "nodes[0].tpm",
        "memory.key_source is tpm but node 'a' has no TPM",
    ),
    Case(
        "air-gapped-model-without-sha256",
        air_gapped(model()),
        4,
        "models[0].sha256",
        "kind air-gapped requires the sha256 of every model's weights",
    ),
    Case(
        "datacenter-model-without-sha256",
        "kind: datacenter\nname: t\n" + model(),
        4,
        "models[0].sha256",
        "kind datacenter requires the sha256 of every model's weights",
    ),
    Case(
        "duplicate-model-name",
        personal(
            model() + "  - name: m\n    engine: llamacpp\n    source: pkg:m/n.gguf\n"
            "    context_length: 2048\n    allowed_roles: [user]\n"
        ),
        9,
        "models[1].name",
        "'m' is already the name or an alias of model 'm'",
    ),
    Case(
        "alias-clashes-with-a-name",
        personal(model("    aliases: [m]\n")),
        9,
        "models[0].aliases[0]",
        "'m' is already the name or an alias of model 'm'",
    ),
    Case(
        "vllm-without-gpu-node",
        personal(model(engine="vllm", source="bundle:models/m")),
        5,
        "models[0].engine",
        "model 'm' uses vllm, which needs a node with gpu: nvidia; no node has one",
    ),
    Case(
        "llamacpp-with-awq",
        personal(model("    quantization: awq\n")),
        9,
        "models[0].quantization",
        "llama.cpp cannot load awq weights",
    ),
    Case(
        "llamacpp-with-gptq",
        personal(model("    quantization: gptq\n")),
        9,
        "models[0].quantization",
        "llama.cpp cannot load gptq weights; use int4 (GGUF) or none",
    ),
    Case(
        "vllm-without-its-server-outside-a-datacenter",
        air_gapped(vllm_model("    vllm:\n      port: 8001\n")),
        4,
        "models[0].replicas",
        "model 'm' uses vllm, which runs beside the gateway, not in it; list its server "
        "(e.g. http://127.0.0.1:8001/v1)",
    ),
    Case(
        "gpu-count-without-a-gpu",
        personal("nodes:\n  - name: n\n    gpu: none\n    gpu_count: 4\n"),
        6,
        "nodes[0].gpu_count",
        "node 'n' has gpu: none, so gpu_count 4 counts nothing",
    ),
    Case(
        "embedded-engine-concurrency-above-one",
        personal(model("    serving:\n      concurrency: 4\n")),
        10,
        "models[0].serving.concurrency",
        "the embedded llama.cpp engine runs one request per worker; raise serving.workers",
    ),
    Case(
        "workers-for-an-upstream-model",
        personal(
            model(
                "    serving:\n      workers: 2\n", engine="upstream", source="http://10.0.0.5/v1"
            )
        ),
        10,
        "models[0].serving.workers",
        "serving.workers applies only to the embedded llama.cpp engine",
    ),
    Case(
        "bad-queue-timeout",
        personal(model("    serving:\n      queue_timeout: soon\n")),
        10,
        "models[0].serving.queue_timeout",
        "expected a duration like 30s, 15m, 24h, 90d, 2w or 7y, got 'soon'",
    ),
    Case(
        "vllm-settings-on-a-llamacpp-model",
        personal(model("    vllm:\n      port: 8001\n")),
        10,
        "models[0].vllm",
        "vllm settings apply only to engine vllm; model 'm' uses llamacpp",
    ),
    Case(
        "vllm-with-int4",
        datacenter(vllm_model("    quantization: int4\n")),
        10,
        "models[0].quantization",
        "int4 is a GGUF file for llama.cpp; for vllm name the 4-bit format: awq, gptq, "
        "compressed-tensors or bitsandbytes",
    ),
    Case(
        "vllm-tensor-parallel-beyond-the-largest-gpu-node",
        datacenter(vllm_model("    vllm:\n      tensor_parallel_size: 2\n")),
        11,
        "models[0].vllm.tensor_parallel_size",
        "tensor_parallel_size 2 needs 2 GPUs on one node; the most any nvidia node has is "
        "gpu_count 1",
    ),
    Case(
        "vllm-max-model-len-beyond-the-context-length",
        datacenter(vllm_model("    vllm:\n      max_model_len: 4096\n")),
        11,
        "models[0].vllm.max_model_len",
        "max_model_len 4096 is longer than the model's context_length 2048",
    ),
    Case(
        "vllm-from-a-pkg-file",
        datacenter(vllm_model(source="pkg:m/m.gguf")),
        6,
        "models[0].source",
        "vLLM loads a weights directory from bundle:<path> or file:/<path>; got 'pkg:m/m.gguf'",
    ),
    Case(
        "vllm-from-the-hub",
        datacenter(vllm_model(source="hf:org/m@0123abc/m.safetensors")),
        6,
        "models[0].source",
        "vLLM loads a weights directory from bundle:<path> or file:/<path>",
    ),
    Case(
        "vllm-bundle-path-leaving-the-bundle",
        datacenter(vllm_model(source="bundle:../../etc")),
        6,
        "models[0].source",
        "bundle:<path> names a path inside the imported bundle, relative and without '..'",
    ),
    Case(
        "vllm-on-the-gateway-port",
        air_gapped(vllm_model("    vllm:\n      port: 8000\n")),
        11,
        "models[0].vllm.port",
        "vllm port 8000 is the gateway's port (127.0.0.1:8000); set vllm.port to a free port",
    ),
    Case(
        "vllm-default-port-is-the-gateway-port",
        air_gapped(vllm_model()),
        4,
        "models[0].vllm.port",
        "vllm port 8000 is the gateway's port",
    ),
    Case(
        "two-vllm-models-on-one-port",
        air_gapped(
            vllm_model("    vllm:\n      port: 8001\n")
            + "  - name: n\n    engine: vllm\n    source: bundle:models/n\n"
            f"    sha256: {SHA}\n    context_length: 2048\n    allowed_roles: [user]\n"
            "    vllm:\n      port: 8001\n"
        ),
        19,
        "models[1].vllm.port",
        "vllm port 8001 is already taken by model 'm'",
    ),
    Case(
        "two-vllm-models-with-one-service-name",
        datacenter(
            model(f"    sha256: {SHA}\n", engine="vllm", source="bundle:models/m").replace(
                "name: m", "name: Big.Model"
            )
            + "  - name: big-model\n    engine: vllm\n    source: bundle:models/n\n"
            f"    sha256: {SHA}\n    context_length: 2048\n    allowed_roles: [user]\n"
        ),
        10,
        "models[1].name",
        "model 'big-model' would get the vLLM service name 'vllm-big-model' of model "
        "'Big.Model'; rename one",
    ),
    Case(
        "upstream-with-a-file-source",
        personal(model(engine="upstream")),
        6,
        "models[0].source",
        "an upstream model's source is the OpenAI-compatible base URL",
    ),
    Case(
        "weights-with-an-unknown-scheme",
        personal(model(source="s3://bucket/m.gguf")),
        6,
        "models[0].source",
        "expected a weights URI with scheme pkg, bundle, file, hf",
    ),
    Case(
        "model-for-an-undefined-role",
        personal(model().replace("[user]", "[user, ghost]")),
        8,
        "models[0].allowed_roles[1]",
        "role 'ghost' is not defined in identity.roles (admin, service, user)",
    ),
    Case(
        "issuer-not-for-the-realm",
        personal("identity:\n  provider: keycloak\n  realm: other\n"),
        3,
        "identity.issuer",
        "a Keycloak issuer ends in /realms/other",
    ),
    Case(
        "local-issuer-outside-personal",
        "kind: edge\nname: t\nidentity:\n  provider: local\n  issuer: http://127.0.0.1:8000/local\n",
        4,
        "identity.provider",
        "the local issuer is for personal nodes only",
    ),
    Case(
        "local-issuer-off-loopback",
        personal("identity:\n  issuer: https://idp.example.org/local\n"),
        4,
        "identity.issuer",
        "a local issuer must be a loopback URL",
    ),
    Case(
        "user-with-an-unknown-role",
        personal("identity:\n  users:\n    - name: ada\n      email: a@b.c\n      roles: [root]\n"),
        7,
        "identity.users[0].roles[0]",
        "role 'root' is not in identity.roles",
    ),
    Case(
        "plain-http-issuer-off-loopback",
        personal(
            "identity:\n  provider: keycloak\n  issuer: http://keycloak.lan/realms/sovereign\n"
        ),
        5,
        "identity.issuer",
        "the issuer must use https unless it is on loopback",
    ),
    Case(
        "qdrant-without-url",
        personal("memory:\n  vector_store: qdrant\n"),
        3,
        "memory.qdrant_url",
        "vector_store qdrant needs qdrant_url",
    ),
    Case(
        "file-keys-without-key-file",
        "kind: edge\nname: t\nmemory:\n  key_source: file\n",
        3,
        "memory.key_file",
        "key_source file needs key_file",
    ),
    Case(
        "upstream-embeddings-without-url",
        personal("memory:\n  embeddings:\n    engine: upstream\n    dimensions: 768\n"),
        4,
        "memory.embeddings.url",
        "engine upstream needs url",
    ),
    Case(
        "upstream-embeddings-without-dimensions",
        personal(
            "memory:\n  embeddings:\n    engine: upstream\n    url: http://127.0.0.1:8080/v1\n"
        ),
        4,
        "memory.embeddings.dimensions",
        "engine upstream needs dimensions",
    ),
    Case(
        "chunk-overlap-not-below-size",
        personal("memory:\n  chunking:\n    size: 64\n    overlap: 64\n"),
        6,
        "memory.chunking.overlap",
        "overlap 64 must be below size 64",
    ),
    Case(
        "chunk-size-over-the-embedding-window",
        personal("memory:\n  chunking:\n    size: 512\n"),
        5,
        "memory.chunking.size",
        "less than or equal to 254",
    ),
    Case(
        "restricted-tag-names-an-unknown-role",
        personal("memory:\n  restricted_tags:\n    hr: [admin, payroll]\n"),
        5,
        "memory.restricted_tags.hr[1]",
        "role 'payroll' is not in identity.roles",
    ),
    Case(
        "clearance-for-an-unknown-role",
        personal("identity:\n  clearances:\n    auditor: secret\n"),
        5,
        "identity.clearances.auditor",
        "role 'auditor' is not in identity.roles",
    ),
    Case(
        "bad-clearance-level",
        personal("identity:\n  clearances:\n    user: top-secret\n"),
        5,
        "identity.clearances.user",
        "Input should be 'public', 'internal', 'confidential' or 'secret'",
    ),
    Case(
        "pcr-out-of-range",
        air_gapped("memory:\n  tpm_pcrs: [7, 24]\n"),
        4,
        "memory.tpm_pcrs[1]",
        "PCR 24 is not in 0..23",
    ),
    Case(
        "runc-in-datacenter",
        "kind: datacenter\nname: t\nsandbox:\n  runtime: runc\n",
        4,
        "sandbox.runtime",
        "use gvisor or kata, not runc",
    ),
    Case(
        "log-only-dlp-when-air-gapped",
        air_gapped("policy:\n  dlp: log\n"),
        4,
        "policy.dlp",
        "must block or redact on a DLP match",
    ),
    Case(
        "retention-shorter-than-checkpoints",
        personal("audit:\n  checkpoint_interval: 1d\n  retention: 1h\n"),
        5,
        "audit.retention",
        "retention 1h is shorter than the checkpoint interval 1d",
    ),
    Case(
        "two-nodes-in-a-personal-profile",
        personal("nodes:\n  - name: a\n  - name: b\n"),
        4,
        "nodes",
        "a personal profile has exactly one node, found 2",
    ),
    Case(
        "duplicate-node-names",
        "kind: edge\nname: t\nnodes:\n  - name: a\n  - name: a\n",
        5,
        "nodes[1].name",
        "node name 'a' is used twice",
    ),
    Case(
        "apple-gpu-on-amd64",
        personal("nodes:\n  - name: a\n    gpu: apple\n"),
        5,
        "nodes[0].gpu",
        "an apple GPU needs arch arm64",
    ),
    Case(
        "enabled-mesh-without-address",
        personal("network:\n  mesh:\n    enabled: true\n"),
        4,
        "network.mesh.address",
        "an enabled mesh needs this node's address",
    ),
    Case(
        "a-default-value-breaks-a-rule",
        "kind: air-gapped\nname: t\nnodes:\n  - name: a\n    tpm: none\n",
        5,
        "nodes[0].tpm",
        "has no TPM",
    ),
]

NODE_IMAGE = [
    Case(
        "egress-to-a-name-without-an-address",
        personal(
            "network:\n  egress:\n    allow:\n      - to: mirror.home:443\n        description: x\n"
        ),
        6,
        "network.egress.allow[0].to",
        "'mirror.home' is a name, and the egress firewall needs its address",
    ),
    Case(
        "mesh-peer-endpoint-without-an-address",
        personal(
            "network:\n  mesh:\n    enabled: true\n    address: 10.1.0.1/24\n    peers:\n"
            "      - name: b\n        public_key: g/6NhoK6bLZxZ1ZwlyBWwl1RRwaLoK0ZMZbnE5BHBK8=\n"
            "        endpoint: peer.home:51820\n        allowed_ips: [10.1.0.2/32]\n"
        ),
        10,
        "network.mesh.peers[0].endpoint",
        "add `peer.home: <address>` under network.hosts",
    ),
    Case(
        "a-host-with-a-bad-address",
        personal("network:\n  hosts:\n    mirror.home: 10.0.0.300\n"),
        5,
        "network.hosts.mirror.home",
        "expected an IPv4 or IPv6 address",
    ),
    Case(
        "an-admin-key-that-is-not-a-key",
        personal("host:\n  admin_keys: [hunter2]\n"),
        4,
        "host.admin_keys[0]",
        "should match pattern",
    ),
    Case(
        "a-data-size-in-terabytes",
        personal("host:\n  disk:\n    data_size: 1T\n"),
        5,
        "host.disk.data_size",
        "should match pattern",
    ),
    Case(
        "a-pcr-past-23",
        personal("host:\n  disk_pcrs: [7, 24]\n"),
        4,
        "host.disk_pcrs[1]",
        "less than or equal to 23",
    ),
]

CLUSTER_IMAGES = "".join(
    f"    {name}: repo/{name.replace('_', '-')}@sha256:{SHA}\n"
    for name in [
        "gateway",
        "keycloak",
        "postgres",
        "opa",
        "spire_server",
        "spire_agent",
        "spire_controller_manager",
        "spiffe_csi_driver",
        "csi_node_driver_registrar",
        "qdrant",
        "vllm",
        "snapshot",
    ]
)


def datacenter_cluster(cluster_extra: str = "", top: str = "") -> str:
    """A datacenter profile with a valid cluster section, plus `cluster_extra` inside it."""
    return (
        "kind: datacenter\nname: t\n"
        "mirrors:\n  - kind: oci\n    url: https://registry.internal:5000/\n"
        "memory:\n  key_source: passphrase\n"
        + top
        + "cluster:\n  registry: registry.internal:5000\n  images:\n"
        + CLUSTER_IMAGES
        + "  storage_class: fast\n  ingress:\n    host: ai.internal\n    tls_secret: tls\n"
        "  trust_domain: dc.internal\n  api_server_cidrs: [10.0.0.0/24]\n"
        "  node_cidrs: [10.0.0.0/16]\n" + cluster_extra
    )


# Lines of datacenter_cluster(): cluster: is line 8, its registry 9, the images 11-22, and
# cluster_extra starts at line 30.
CLUSTER = [
    Case(
        "a-cluster-on-an-edge-node",
        datacenter_cluster().replace("kind: datacenter", "kind: edge"),
        9,
        "cluster",
        "cluster is for kind datacenter, not edge",
    ),
    Case(
        "a-cluster-registry-that-is-no-mirror",
        datacenter_cluster().replace("registry: registry.internal", "registry: other.internal"),
        9,
        "cluster.registry",
        "is not one of the profile's oci mirrors (registry.internal:5000)",
    ),
    Case(
        "an-image-by-tag",
        datacenter_cluster().replace(f"repo/vllm@sha256:{SHA}", "repo/vllm:latest"),
        21,
        "cluster.images.vllm",
        "should match pattern",
    ),
    Case(
        "a-gateway-ceiling-below-its-floor",
        datacenter_cluster("  gateway:\n    replicas: 4\n    max_replicas: 3\n"),
        32,
        "cluster.gateway.max_replicas",
        "max_replicas 3 is below replicas 4",
    ),
    Case(
        "a-tpm-key-for-gateway-pods",
        datacenter_cluster().replace("key_source: passphrase", "key_source: tpm"),
        7,
        "memory.key_source",
        "a gateway pod cannot reach a node's TPM",
    ),
    Case(
        "a-snapshot-schedule-that-is-not-cron",
        datacenter_cluster("  qdrant:\n    snapshot_schedule: nightly\n"),
        31,
        "cluster.qdrant.snapshot_schedule",
        "should match pattern",
    ),
]

TLS = [
    Case(
        "plain-http-on-a-network-address",
        personal("gateway:\n  listen: 0.0.0.0:8000\n"),
        4,
        "gateway.listen",
        "0.0.0.0:8000 is not a loopback address: plain HTTP is allowed only on loopback",
    ),
    Case(
        "air-gapped-without-tls",
        air_gapped("gateway:\n  listen: 127.0.0.1:8000\n  tls: null\n"),
        5,
        "gateway.tls",
        "kind air-gapped serves clients over TLS only",
    ),
    Case(
        "a-certificate-without-its-key",
        personal("gateway:\n  listen: 10.0.0.5:443\n  tls:\n    certificate: /etc/gw.pem\n"),
        5,
        "gateway.tls.key",
        "key is required with the other",
    ),
    Case(
        "a-certificate-and-a-local-ca",
        personal(
            "gateway:\n  listen: 127.0.0.1:8443\n  tls:\n    certificate: /etc/gw.pem\n"
            "    key: /etc/gw.key\n    local_ca: true\n"
        ),
        8,
        "gateway.tls.local_ca",
        "give certificate and key, or local_ca, not both",
    ),
    Case(
        "tls-with-neither",
        personal("gateway:\n  listen: 127.0.0.1:8443\n  tls:\n    names: [gw.local]\n"),
        6,
        "gateway.tls",
        "set certificate and key (PEM files), or local_ca: true",
    ),
    Case(
        "a-relative-certificate-path",
        personal(
            "gateway:\n  listen: 127.0.0.1:8443\n  tls:\n    certificate: gw.pem\n"
            "    key: /etc/gw.key\n"
        ),
        6,
        "gateway.tls.certificate",
        "should match pattern '^/'",
    ),
    Case(
        "a-server-name-that-is-no-name",
        personal(
            "gateway:\n  listen: 127.0.0.1:8443\n  tls:\n    local_ca: true\n"
            "    names: [Gateway_1]\n"
        ),
        7,
        "gateway.tls.names[0]",
        "is not a valid IP address or lower-case DNS name",
    ),
    Case(
        "tls-on-a-cluster-pod",
        "kind: datacenter\nname: t\ngateway:\n  listen: 0.0.0.0:8000\n  tls:\n    local_ca: true\n",
        6,
        "gateway.tls",
        "the Ingress terminates TLS with cluster.ingress.tls_secret",
    ),
]

ALL = SYNTAX_AND_SHAPE + FIELDS + RULES + NODE_IMAGE + CLUSTER + TLS


@pytest.mark.parametrize("case", ALL, ids=lambda case: case.id)
def test_bad_profile_exits_2_and_names_file_line_field(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(case.text)
    result = CliRunner().invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [LINE.match(line) for line in result.stderr.splitlines()]
    issues = [match for match in lines if match is not None]
    assert issues, result.stderr
    wanted = [m for m in issues if m["path"] == case.path and case.why in m["why"]]
    assert wanted, f"no line for {case.path} containing {case.why!r} in:\n{result.stderr}"
    assert wanted[0]["file"] == str(path)
    assert int(wanted[0]["line"]) == case.line
    if case.column is not None:
        assert int(wanted[0]["col"]) == case.column
    assert "Traceback" not in result.output + result.stderr


def test_a_value_from_the_defaults_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    # The rule is broken by memory.key_source, which only the air-gapped defaults set.
    path.write_text("kind: personal\nname: t\nnodes:\n  - name: a\n    tpm: required\n")
    result = CliRunner().invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2
    assert "memory.key_source: node 'a' requires a TPM" in result.stderr
    assert "(the value comes from the personal defaults)" in result.stderr


def test_all_errors_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(personal("nodes:\n  - name: a\n    arch: x86\n    gpu: amd\n"))
    result = CliRunner().invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2
    assert "nodes[0].arch" in result.stderr
    assert "nodes[0].gpu" in result.stderr


def test_valid_and_invalid_files_are_each_reported(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(personal(""))
    bad.write_text("kind: laptop\nname: t\n")
    result = CliRunner().invoke(app, ["profile", "validate", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"{good}: valid personal profile 't'" in result.stdout
    assert "1 of 2 profile(s) invalid" in result.stderr


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml:1:1: error: <file>: cannot read: No such file or directory" in result.stderr


def test_non_utf8_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("kind: personal\nname: caf\xe9\n".encode("latin-1"))
    result = CliRunner().invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2
    assert "cannot read: not UTF-8 text" in result.stderr


def test_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The real console script, not the in-process runner: exit code and stderr as a user sees."""
    path = tmp_path / "bad.yaml"
    path.write_text("kind: personal\nname: t\nnetwork:\n  mesh:\n    listen_port: x\n")
    script = Path(sys.executable).with_name("sovereign")
    proc = subprocess.run(
        [script, "profile", "validate", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{path}:5:18: error: network.mesh.listen_port: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["profile", "show"], ["render", "--out", "rendered"]])
def test_other_profile_commands_refuse_bad_profiles_with_exit_2(
    command: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: personal\nname: t\nbogus: 1\n")
    argv = [command[0], *command[1:2], str(path), *command[2:]]
    if command[0] == "render":
        argv = ["render", str(path), "--out", str(tmp_path / "rendered")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert "bad.yaml:3:1: error: bogus: unknown field 'bogus'" in result.stderr
    assert not (tmp_path / "rendered").exists()
