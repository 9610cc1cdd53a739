"""TLS and mutual TLS on the gRPC and HTTP ports, with a test CA made on the fly.

Two servers: one with TLS on both ports, one with mutual TLS on both. ``launch`` and the
stream helpers are shared with test_access.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import queue
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from pagedserve.server.tls import TlsConfigError, TlsOptions, grpc_credentials
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ROOT,
    ServerHandle,
    free_port,
    is_final,
    llm_inputs,
    start_server,
    text_of,
)

slow = pytest.mark.slow  # every test that needs a server process (model load: ~10 s)

# ---- shared helpers ------------------------------------------------------------------------


def launch(repo: Path, *extra_args: str, timeout: float = 180) -> ServerHandle:
    """``conftest.start_server`` without its plaintext liveness probe, which a TLS port or a
    restricted health group refuses by design."""
    return start_server(repo, *extra_args, timeout=timeout, probe=False)


def stream_text(client: grpcclient.InferenceServerClient, prompt: str = "The capital of France is",
                max_tokens: int = 2, headers: dict[str, str] | None = None,
                timeout: float = 120) -> str:
    """One streamed request on a fresh stream: the generated text; raises the stream's error."""
    results: queue.Queue[tuple[object, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers=headers)
    try:
        # If the stream already failed this raises; its error is in the queue either way.
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer(MODEL, llm_inputs(prompt, max_tokens), request_id="s")
        text = ""
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            text += text_of(result)
            if is_final(result):
                return text
    finally:
        client.stop_stream()


def stream_error(client: grpcclient.InferenceServerClient,
                 headers: dict[str, str] | None = None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        stream_text(client, headers=headers)
    return e.value


# ---- a test PKI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate
    signed by the CA, and a client certificate signed by another CA (``rogue``)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 usage: x509.ObjectIdentifier | None = None,
                 san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_ca_key = new_key(), new_key()
    ca = _certificate("pagedserve test CA", ca_key, _name("pagedserve test CA"), ca_key,
                      ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server_key = new_key()
    server = _certificate("localhost", server_key, ca.subject, ca_key,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH,
                          san=[x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key, rogue_key = new_key(), new_key()
    client = _certificate("client", client_key, ca.subject, ca_key,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("rogue", rogue_key, _name("another CA"), rogue_ca_key,
                         usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca_path, *_write(directory, "server", server, server_key),
               *_write(directory, "client", client, client_key),
               *_write(directory, "rogue", rogue, rogue_key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_args(pki: Pki, proto: str, mutual: bool) -> list[str]:
    args = [f"--{proto}-use-ssl-mutual=true" if mutual else f"--{proto}-use-ssl",
            f"--{proto}-server-cert", str(pki.server_cert),
            f"--{proto}-server-key", str(pki.server_key)]
    return [*args, f"--{proto}-root-cert", str(pki.ca)] if mutual else args


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ServerHandle]:
    handle = launch(DEFAULT_REPOSITORY, *_tls_args(pki, "grpc", False),
                    *_tls_args(pki, "http", False), "--http-idle-timeout", "2")
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerHandle]:
    handle = launch(DEFAULT_REPOSITORY, *_tls_args(pki, "grpc", True),
                    *_tls_args(pki, "http", True))
    yield handle
    assert handle.stop() == 0


def _client(server: ServerHandle, pki: Pki, cert: Path | None = None, key: Path | None = None,
            ) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True,
                                            root_certificates=str(pki.ca),
                                            private_key=None if key is None else str(key),
                                            certificate_chain=None if cert is None else str(cert))


def _https_get(server: ServerHandle, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    url = f"https://127.0.0.1:{server.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _trusting(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


# ---- TLS -----------------------------------------------------------------------------------


@slow
def test_tls_stream_inference_round_trip(tls_server: ServerHandle, pki: Pki) -> None:
    client = _client(tls_server, pki)
    try:
        assert client.is_server_live()
        assert stream_text(client, max_tokens=3)  # a real generation over TLS
    finally:
        client.close()
    assert "Started GRPCInferenceService at 127.0.0.1" in tls_server.log()
    assert "(TLS)" in tls_server.log()


@slow
def test_plaintext_client_fails_cleanly_and_server_keeps_serving(
        tls_server: ServerHandle, pki: Pki) -> None:
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            plain.is_server_live(client_timeout=10)
        assert e.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        plain.close()
    client = _client(tls_server, pki)
    try:
        assert client.is_server_live()
    finally:
        client.close()


@slow
def test_https_health_trusting_the_test_ca(tls_server: ServerHandle, pki: Pki) -> None:
    assert _https_get(tls_server, "/v2/health/live", _trusting(pki)) == (200, "")
    status, text = _https_get(tls_server, "/metrics", _trusting(pki))
    assert status == 200 and "nv_inference_request_success" in text
    with pytest.raises(urllib.error.URLError):  # certificate of an unknown CA
        _https_get(tls_server, "/v2/health/live", ssl.create_default_context())
    # A plaintext HTTP request is dropped at the handshake, and HTTPS goes on.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.http_port}/v2/health/live",
                               timeout=10)
    assert _https_get(tls_server, "/v2/health/ready", _trusting(pki)) == (200, "")


@slow
def test_silent_tls_connection_is_closed_and_does_not_block_others(
        tls_server: ServerHandle, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=60) as silent:
        # The handshake this connection never starts waits on its own thread: others go on.
        assert _https_get(tls_server, "/v2/health/live", _trusting(pki)) == (200, "")
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server after --http-idle-timeout 2
        assert time.monotonic() - started < 30


# ---- mutual TLS ----------------------------------------------------------------------------


@slow
def test_mutual_tls_needs_a_client_certificate_signed_by_the_ca(
        mtls_server: ServerHandle, pki: Pki) -> None:
    for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
        client = _client(mtls_server, pki, cert, key)
        try:
            with pytest.raises(InferenceServerException) as e:
                client.is_server_live(client_timeout=10)
            assert e.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            client.close()
    client = _client(mtls_server, pki, pki.client_cert, pki.client_key)
    try:
        assert client.is_server_live()
        assert stream_text(client)
    finally:
        client.close()
    assert "(mutual TLS)" in mtls_server.log()


@slow
def test_mutual_https_needs_a_client_certificate(mtls_server: ServerHandle, pki: Pki) -> None:
    for context in (_trusting(pki), _trusting(pki, pki.rogue_cert, pki.rogue_key)):
        with pytest.raises(OSError):  # refused at the handshake or at the first read
            _https_get(mtls_server, "/v2/health/live", context)
    context = _trusting(pki, pki.client_cert, pki.client_key)
    assert _https_get(mtls_server, "/v2/health/live", context) == (200, "")


# ---- start-up errors -----------------------------------------------------------------------


def _tls_error(pki: Pki, **changes: Path | bool | None) -> str:
    options = TlsOptions("--grpc", pki.server_cert, pki.server_key)
    with pytest.raises(TlsConfigError) as e:
        grpc_credentials(dataclasses.replace(options, **changes))
    return str(e.value)


def test_bad_tls_files_are_named_by_their_flag(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    assert _tls_error(pki, server_cert=missing).startswith(
        f"--grpc-server-cert: cannot read '{missing}'")
    assert _tls_error(pki, server_key=None) == \
        "--grpc-server-key is required with --grpc-use-ssl"
    assert _tls_error(pki, mutual=True) == \
        "--grpc-root-cert is required with --grpc-use-ssl-mutual"
    mismatched = _tls_error(pki, server_cert=pki.client_cert)  # another certificate's key
    assert mismatched.startswith(f"--grpc-server-cert '{pki.client_cert}' and "
                                 f"--grpc-server-key '{pki.server_key}' are not")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert _tls_error(pki, root_cert=garbage, mutual=True).startswith(
        f"--grpc-root-cert '{garbage}' holds no PEM certificate")


def test_a_bad_tls_file_stops_the_server_before_any_model_loads(pki: Pki, tmp_path: Path
                                                                ) -> None:
    missing = tmp_path / "missing.pem"
    command = [sys.executable, "-m", "pagedserve", "serve", "--host", "127.0.0.1",
               "--grpc-port", str(free_port()), "--http-port", "0", "--metrics-port", "0",
               "--http-use-ssl", "--http-server-cert", str(pki.server_cert),
               "--http-server-key", str(missing)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"error: --http-server-key: cannot read '{missing}'" in done.stderr
    assert "smollm2" not in done.stdout + done.stderr  # failed before the repository loaded
