"""TLS 1.3 on the gateway's client boundary, against the real gateway process.

The node-local CA issues the server certificate; clients trusting its exported ca.pem get
answers (the OpenAI SDK included); TLS 1.2, other CAs and plain HTTP are refused; and an
expired operator certificate is reported in /health. Chat goes to the session's fixed
upstream, a real HTTP server that answers at once.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import START_TIMEOUT_S, GatewayFactory, RunningGateway

pytestmark = pytest.mark.slow


def _port(gateway: RunningGateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def _client_context(trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trusted))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _wait_for_tls(gateway: RunningGateway, trusted: Path | ssl.SSLContext) -> httpx.Response:
    """/health over TLS, once the gateway serves it; `trusted` may be a CA file it writes."""
    url = f"https://127.0.0.1:{_port(gateway)}/health"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if gateway.process.poll() is not None:
            pytest.fail(f"the gateway exited:\n{gateway.log.read_text()[-4000:]}")
        try:
            context = _client_context(trusted) if isinstance(trusted, Path) else trusted
            return httpx.get(url, verify=context, timeout=5)
        except (httpx.ConnectError, FileNotFoundError):
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer:\n{gateway.log.read_text()[-4000:]}")
            time.sleep(0.2)


def _local_ca(home: Path) -> str:
    return (
        f"  tls:\n    local_ca: true\n    ca_dir: {home}/tls\n    names: [gateway.ward.internal]\n"
    )


@pytest.fixture
def tls_gateway(gateway_factory: GatewayFactory, tmp_path: Path) -> RunningGateway:
    gateway = gateway_factory(wait=False, gateway=_local_ca(tmp_path / "node"))
    _wait_for_tls(gateway, tmp_path / "node" / "tls" / "ca.pem")
    return gateway


def test_the_openai_sdk_trusting_the_exported_ca_gets_an_answer(
    tls_gateway: RunningGateway,
) -> None:
    ca = tls_gateway.home / "tls" / "ca.pem"
    with httpx.Client(verify=_client_context(ca)) as client:
        sdk = openai.OpenAI(
            base_url=f"https://127.0.0.1:{_port(tls_gateway)}/v1",
            api_key=tls_gateway.token(),
            http_client=client,
        )
        answer = sdk.chat.completions.create(
            model="echo-1", messages=[{"role": "user", "content": "over TLS"}]
        )
    assert "over TLS" in (answer.choices[0].message.content or "")
    health = _wait_for_tls(tls_gateway, _client_context(ca))
    tls = health.json()["components"]["tls"]
    assert tls["ready"] is True
    assert tls["detail"].startswith("TLS 1.3; certificate valid until ")
    assert stat.S_IMODE((ca.parent / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca.parent / "server.key").stat().st_mode) == 0o600
    served = x509.load_pem_x509_certificate((ca.parent / "server.pem").read_bytes())
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gateway.ward.internal" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_tls_1_2_another_ca_and_plain_http_are_refused(
    tls_gateway: RunningGateway, tmp_path: Path
) -> None:
    port = _port(tls_gateway)
    ca = tls_gateway.home / "tls" / "ca.pem"

    old = ssl.create_default_context(cafile=str(ca))
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    # The server answers a protocol_version alert, or (uvloop, at times) just closes.
    with (
        pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNEXPECTED_EOF"),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
    ):
        old.wrap_socket(raw, server_hostname="127.0.0.1")

    other = _other_ca(tmp_path)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{port}/health", verify=_client_context(other), timeout=10)

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)

    # And the gateway still serves a client that trusts its CA.
    assert _wait_for_tls(tls_gateway, _client_context(ca)).status_code == 200


def test_a_restart_keeps_the_ca_and_the_certificate(
    gateway_factory: GatewayFactory, tls_gateway: RunningGateway
) -> None:
    tls = tls_gateway.home / "tls"
    before = {name: (tls / name).read_bytes() for name in ("ca.pem", "server.pem")}
    tls_gateway.stop()
    again = gateway_factory(wait=False, port=_port(tls_gateway), gateway=_local_ca(tls.parent))
    _wait_for_tls(again, tls / "ca.pem")
    assert {name: (tls / name).read_bytes() for name in before} == before


def test_admin_health_checks_the_gateway_over_tls(tls_gateway: RunningGateway) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sovereign_gateway", "admin", "health", "--config",
         str(tls_gateway.config_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ https://127.0.0.1:{_port(tls_gateway)}: ready" in result.stdout
    assert "  ✓ tls: TLS 1.3; certificate valid until" in result.stdout


def test_an_expired_certificate_is_reported_in_health(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    certificate, key = _expired_certificate(tmp_path)
    gateway = gateway_factory(
        wait=False, gateway=f"  tls:\n    certificate: {certificate}\n    key: {key}\n"
    )
    # Only to read what /health says: no client would accept this certificate.
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    health = _wait_for_tls(gateway, blind)
    assert health.status_code == 503
    tls = health.json()["components"]["tls"]
    assert tls["ready"] is False
    assert f"the server certificate {certificate} expired on " in tls["detail"]
    trusting = ssl.create_default_context(cafile=str(certificate))
    with pytest.raises(httpx.ConnectError, match="certificate has expired"):
        httpx.get(f"https://localhost:{_port(gateway)}/health", verify=trusting, timeout=10)


def test_a_bad_certificate_stops_the_gateway_with_the_file_named(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    certificate, _ = _expired_certificate(tmp_path)
    wrong_key = tmp_path / "other.key"
    wrong_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    gateway = gateway_factory(
        wait=False, gateway=f"  tls:\n    certificate: {certificate}\n    key: {wrong_key}\n"
    )
    assert gateway.process.wait(timeout=60) == 2
    said = gateway.log.read_text()
    assert f"cannot use {certificate} with {wrong_key}" in said
    assert "Traceback" not in said


def _other_ca(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "other-ca.pem"
    path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return path


def _expired_certificate(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ended = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ended - datetime.timedelta(days=30))
        .not_valid_after(ended)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = tmp_path / "expired.pem", tmp_path / "expired.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return certificate_path, key_path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_health_of_a_plain_loopback_gateway_has_no_tls_component(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    components = json.loads(gateway.call("GET", "/health")[2])["components"]
    assert "tls" not in components
