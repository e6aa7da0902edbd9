"""Constrained string types shared by the profile model.

Each type is a `str` checked by a validator, so a resolved profile dumps back to
exactly what the user wrote, and the JSON Schema carries a pattern an editor can use.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

# The gateway's contract defines these once; the profile re-exports them as they are.
from sovereign_gateway.contract import DURATION_PATTERN
from sovereign_gateway.contract import Classification as Classification
from sovereign_gateway.contract import DlpMode as DlpMode
from sovereign_gateway.contract import Engine as Engine
from sovereign_gateway.contract import KeySource as KeySource
from sovereign_gateway.contract import Kind as Kind
from sovereign_gateway.contract import Quantization as Quantization
from sovereign_gateway.contract import VectorStore as VectorStore
from sovereign_gateway.contract import duration_seconds as duration_seconds

NodeRole = Literal["standalone", "controlplane", "worker"]
Arch = Literal["amd64", "arm64"]
Gpu = Literal["nvidia", "apple", "none"]
TpmPolicy = Literal["required", "optional", "none"]
HostOS = Literal["debian", "talos", "nixos"]
KvCacheDtype = Literal["auto", "fp8"]
SandboxRuntime = Literal["gvisor", "kata", "runc"]
Protocol = Literal["tcp", "udp"]
MirrorKind = Literal["pypi", "oci", "debian", "models"]
Permission = Literal[
    "chat",
    "embeddings",
    "ingest",
    "query",
    "embed",
    "models:read",
    "audit:read",
    "admin",
]

_HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def _check_duration(value: str) -> str:
    duration_seconds(value)
    return value


def _check_hostname(host: str) -> None:
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a valid IP address or lower-case DNS name")


def split_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port`; the host is a DNS name or an IP address."""
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port or a CIDR such as 10.0.0.0/8, got {value!r}")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            _check_hostname(host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"expected a CIDR network such as 10.0.0.0/8: {exc}") from None
    return value


def _check_interface_cidr(value: str) -> str:
    if "/" not in value:
        raise ValueError(
            f"expected an address with a prefix length, such as 10.88.0.1/24, got {value!r}"
        )
    try:
        ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_destination(value: str) -> str:
    return _check_cidr(value) if "/" in value else _check_host_port(value)


def is_cidr(destination: str) -> bool:
    return "/" in destination


Duration = Annotated[
    str,
    AfterValidator(_check_duration),
    Field(pattern=DURATION_PATTERN, examples=["30s", "15m", "24h", "90d", "7y"]),
]
HostPort = Annotated[str, AfterValidator(_check_host_port), Field(examples=["127.0.0.1:8000"])]
Cidr = Annotated[str, AfterValidator(_check_cidr), Field(examples=["10.88.0.0/24"])]
InterfaceCidr = Annotated[
    str, AfterValidator(_check_interface_cidr), Field(examples=["10.88.0.1/24"])
]
Destination = Annotated[
    str,
    AfterValidator(_check_destination),
    Field(
        description="host:port, [ipv6]:port, or a CIDR network",
        examples=["mirror.airgap.internal:443", "10.88.0.0/24"],
    ),
]
DnsLabel = Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got {value!r}") from None
    return value


def _check_host_name(value: str) -> str:
    _check_hostname(value)
    return value


IpAddress = Annotated[str, AfterValidator(_check_ip), Field(examples=["10.88.0.10"])]
HostName = Annotated[
    str, AfterValidator(_check_host_name), Field(examples=["mirror.ward.internal"])
]
# An OpenSSH public key line: type, base64 blob, optional comment.
SshPublicKey = Annotated[
    str,
    Field(
        pattern=r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa|sk-ssh-ed25519@openssh.com)"
        r" [A-Za-z0-9+/]+={0,3}( [^\n]*)?$",
        examples=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... operator@console"],
    ),
]
# A size with a binary unit: 512M, 2G.
ByteSize = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,5}[MG]$", examples=["512M", "2G"])]
Pcr = Annotated[int, Field(ge=0, le=23)]


def byte_size(value: str) -> int:
    return int(value[:-1]) * (1 << 20 if value.endswith("M") else 1 << 30)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex SHA-256")]
# A WireGuard public key is 32 bytes, base64 with padding.
WireGuardKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")]
AbsolutePath = Annotated[str, Field(pattern=r"^/", description="an absolute path")]
