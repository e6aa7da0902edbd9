"""TLS 1.3 on the client boundary: the server context, a node-local CA, certificate state.

Takes `listen.tls`; gives a TLS 1.3-only `SSLContext`, and in local_ca mode a CA on the
node that issues the server's certificate for its names, again before it expires.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sovereign_gateway.contract import LOCAL_CA_CERTIFICATE, TLS, write_atomic

CA_CERTIFICATE = LOCAL_CA_CERTIFICATE
CA_KEY = "ca.key"
SERVER_CERTIFICATE = "server.pem"
SERVER_KEY = "server.key"
CA_LIFETIME = datetime.timedelta(days=3650)
# What public CAs may issue at most (CA/Browser Forum); the gateway reissues well before.
SERVER_LIFETIME = datetime.timedelta(days=397)
RENEW_BEFORE = datetime.timedelta(days=30)
# /health warns, while still ready, when the certificate ends sooner than this.
EXPIRY_WARNING = datetime.timedelta(days=14)


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file."""


@dataclass(frozen=True)
class ServerFiles:
    certificate: Path
    key: Path


def server_context(files: ServerFiles) -> ssl.SSLContext:
    """A server context that speaks TLS 1.3 and nothing older."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(files.certificate, files.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise TlsError(f"cannot use {files.certificate} with {files.key}: {reason}") from None
    return context


def client_context(trusted: Path) -> ssl.SSLContext:
    """A TLS 1.3 client context that trusts `trusted` (a CA, or the served chain itself)."""
    context = ssl.create_default_context(cafile=str(trusted))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # The served chain may end below a root: trusting one of its own certificates is enough.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def server_files(settings: TLS, resolve: Callable[[str], Path]) -> ServerFiles:
    """Where the served certificate and its key are: the operator's, or the local CA's."""
    if settings.ca_dir is not None and settings.mode == "local_ca":
        ca_dir = resolve(settings.ca_dir)
        return ServerFiles(ca_dir / SERVER_CERTIFICATE, ca_dir / SERVER_KEY)
    if settings.certificate is None or settings.key is None:
        raise TlsError("listen.tls in mode files names no certificate and key")
    return ServerFiles(resolve(settings.certificate), resolve(settings.key))


def ensure_local_ca(
    ca_dir: Path, names: list[str], profile: str, now: datetime.datetime | None = None
) -> ServerFiles:
    """The CA in `ca_dir` (made on first use) and a server certificate it issued for `names`,
    issued again when missing, within RENEW_BEFORE of its end, for other names, or by
    another CA. Keys are written 0600, and every file whole or not at all."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = _ensure_ca(ca_dir, profile, now)
    files = ServerFiles(ca_dir / SERVER_CERTIFICATE, ca_dir / SERVER_KEY)
    if _server_is_current(files, ca_cert, names, now):
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # The key first: a certificate is never on disk without the key that goes with it.
    write_atomic(files.key, _private_pem(key), 0o600)
    chain = certificate.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    write_atomic(files.certificate, chain, 0o644)
    return files


def certificate_state(path: Path, now: datetime.datetime | None = None) -> tuple[bool, str]:
    """Whether the served certificate is valid now, and until when: for /health."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return False, f"cannot read the server certificate {path}: {exc}"
    ends = certificate.not_valid_after_utc
    starts = certificate.not_valid_before_utc
    if now >= ends:
        return False, f"the server certificate {path} expired on {ends:%Y-%m-%d %H:%M} UTC"
    if now < starts:
        return False, f"the server certificate {path} is valid only from {starts:%Y-%m-%d} UTC"
    left = ends - now
    warning = f"; renew it: {left.days} day(s) left" if left < EXPIRY_WARNING else ""
    return True, f"TLS 1.3; certificate valid until {ends:%Y-%m-%d} UTC{warning}"


def _ensure_ca(
    ca_dir: Path, profile: str, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERTIFICATE
    if key_path.exists() and cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TlsError(f"the local CA in {ca_dir} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{key_path} is not an EC private key")
        if certificate.not_valid_after_utc <= now:
            raise TlsError(
                f"the local CA {cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; "
                "move ca_dir away to make a new one, and hand its ca.pem to the clients"
            )
        return key, certificate
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SovereignStack node"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{profile} local CA"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(key_path, _private_pem(key), 0o600)
    write_atomic(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, certificate


def _server_is_current(
    files: ServerFiles, ca_cert: x509.Certificate, names: list[str], now: datetime.datetime
) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(files.certificate.read_bytes())
        serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    try:
        certificate.verify_directly_issued_by(ca_cert)
        present = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return (
        set(present.value) == set(_alt_names(names))
        and certificate.not_valid_after_utc - RENEW_BEFORE > now
    )


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return alt


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
