"""The node-local CA and the server certificate it issues; the state /health reports."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from sovereign_gateway import tls

NAMES = ["ward-gpu-01", "gateway.ward.internal", "127.0.0.1"]
NOW = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_a_first_start_makes_the_ca_and_a_certificate_for_the_names(tmp_path: Path) -> None:
    files = tls.ensure_local_ca(tmp_path / "tls", NAMES, "ward", now=NOW)
    ca = _certificate(tmp_path / "tls" / "ca.pem")
    served = _certificate(files.certificate)
    served.verify_directly_issued_by(ca)
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == NAMES[:2]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / "tls" / key).stat().st_mode) == 0o600
    # The served chain carries the CA, so a client holding only ca.pem builds the path.
    assert len(x509.load_pem_x509_certificates(files.certificate.read_bytes())) == 2


def test_a_current_certificate_is_kept_and_a_changed_one_reissued(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    tls.ensure_local_ca(directory, NAMES, "ward", now=NOW)
    ca = (directory / "ca.pem").read_bytes()
    first = (directory / "server.pem").read_bytes()

    tls.ensure_local_ca(directory, NAMES, "ward", now=NOW + datetime.timedelta(days=300))
    assert (directory / "server.pem").read_bytes() == first

    tls.ensure_local_ca(directory, [*NAMES, "ward.example"], "ward", now=NOW)
    renamed = (directory / "server.pem").read_bytes()
    assert renamed != first

    # Within 30 days of its end the certificate is issued again, by the same CA.
    tls.ensure_local_ca(
        directory, [*NAMES, "ward.example"], "ward", now=NOW + datetime.timedelta(days=380)
    )
    assert (directory / "server.pem").read_bytes() != renamed
    assert (directory / "ca.pem").read_bytes() == ca


def test_an_expired_ca_is_refused_naming_it(tmp_path: Path) -> None:
    tls.ensure_local_ca(tmp_path, NAMES, "ward", now=NOW)
    with pytest.raises(tls.TlsError, match=f"the local CA {tmp_path / 'ca.pem'} expired"):
        tls.ensure_local_ca(tmp_path, NAMES, "ward", now=NOW + datetime.timedelta(days=4000))


def test_the_certificate_state_says_until_when_and_warns_before_the_end(tmp_path: Path) -> None:
    files = tls.ensure_local_ca(tmp_path, NAMES, "ward", now=NOW)
    ready, detail = tls.certificate_state(files.certificate, now=NOW)
    assert ready
    assert detail == "TLS 1.3; certificate valid until 2028-01-08 UTC"
    ready, detail = tls.certificate_state(files.certificate, now=NOW + datetime.timedelta(days=390))
    assert ready
    assert detail.endswith("; renew it: 7 day(s) left")
    ready, detail = tls.certificate_state(files.certificate, now=NOW + datetime.timedelta(days=400))
    assert not ready
    assert detail.startswith(f"the server certificate {files.certificate} expired on 2028-01-08")
    ready, detail = tls.certificate_state(tmp_path / "absent.pem", now=NOW)
    assert not ready
    assert "cannot read the server certificate" in detail


def test_the_server_speaks_tls_1_3_only(tmp_path: Path) -> None:
    context = tls.server_context(tls.ensure_local_ca(tmp_path, NAMES, "ward"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3


def test_a_key_that_does_not_match_is_refused_naming_both_files(tmp_path: Path) -> None:
    files = tls.ensure_local_ca(tmp_path / "a", NAMES, "ward")
    other = tls.ensure_local_ca(tmp_path / "b", NAMES, "ward")
    with pytest.raises(tls.TlsError, match=f"cannot use {files.certificate} with {other.key}"):
        tls.server_context(tls.ServerFiles(files.certificate, other.key))
