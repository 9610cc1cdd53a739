"""TLS settings of one port (gRPC or HTTP) and the credentials built from them.

The flags are tritonserver's (``--grpc-use-ssl``, ``--grpc-use-ssl-mutual``,
``--grpc-server-cert``, ``--grpc-server-key``, ``--grpc-root-cert``) and their ``--http-*``
twins. Every file is read and checked at start-up, so a missing or mismatched file stops the
server with a message naming the flag instead of failing the first handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A TLS flag is missing, or names a file that cannot be used."""


@dataclass(frozen=True)
class TlsOptions:
    """PEM files of one port; ``flag_prefix`` (``--grpc``/``--http``) names flags in errors."""

    flag_prefix: str
    server_cert: Path | None
    server_key: Path | None
    root_cert: Path | None = None
    mutual: bool = False  # clients must present a certificate signed by ``root_cert``

    def flag(self, name: str) -> str:
        return f"{self.flag_prefix}-{name}"


def _require(options: TlsOptions, path: Path | None, name: str, because: str) -> Path:
    if path is None:
        raise TlsConfigError(f"{options.flag(name)} is required with {options.flag(because)}")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise TlsConfigError(f"{options.flag(name)}: cannot read '{path}': "
                             f"{e.strerror or e}") from None
    return path


def _no_passphrase() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal; gRPC cannot use
    # one either, so an empty passphrase turns it into a clear start-up error.
    return b""


def ssl_context(options: TlsOptions) -> ssl.SSLContext:
    """A server-side context (TLS 1.2+), every file checked; raises ``TlsConfigError``."""
    cert = _require(options, options.server_cert, "server-cert", "use-ssl")
    key = _require(options, options.server_key, "server-key", "use-ssl")
    root = options.root_cert
    if options.mutual:
        root = _require(options, root, "root-cert", "use-ssl-mutual")
    elif root is not None:
        root = _require(options, root, "root-cert", "use-ssl")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (ssl.SSLError, ValueError) as e:
        raise TlsConfigError(
            f"{options.flag('server-cert')} '{cert}' and {options.flag('server-key')} '{key}' "
            f"are not a PEM certificate and its unencrypted private key: {e}") from None
    if root is not None:
        try:
            context.load_verify_locations(cafile=str(root))
        except ssl.SSLError as e:
            raise TlsConfigError(f"{options.flag('root-cert')} '{root}' holds no PEM "
                                 f"certificate: {e}") from None
    if options.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_credentials(options: TlsOptions) -> grpc.ServerCredentials:
    """gRPC server credentials from the same files, checked through ``ssl_context`` first."""
    ssl_context(options)  # gRPC only reports bad PEM data at the first handshake
    assert options.server_cert is not None and options.server_key is not None
    root = options.root_cert.read_bytes() if options.root_cert is not None else None
    return grpc.ssl_server_credentials(
        [(options.server_key.read_bytes(), options.server_cert.read_bytes())],
        root_certificates=root, require_client_auth=options.mutual)
