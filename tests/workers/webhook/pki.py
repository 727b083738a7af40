"""The TLS tests' throwaway PKI (a private CA, server and client certificates) and servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from formcraftd.core.config import WebhookTlsConfig

CLIENT_NAME = "formcraftd-test-client"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files, all in one folder."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a second CA that signed nothing here
    encrypted_client_key: Path  # client_key, encrypted with a password

    def client_entry(
        self, host: str = "127.0.0.1", ca_file: Path | None = None
    ) -> WebhookTlsConfig:
        """A `[[workers.webhook.tls]]` entry giving `host` the client certificate and key,
        trusting the test CA (or `ca_file`)."""
        return WebhookTlsConfig(
            host=host,
            client_cert=str(self.client_cert),
            client_key=str(self.client_key),
            ca_file=str(ca_file or self.ca_cert),
        )

    def server_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate signed by the CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        context.load_cert_chain(self.server_cert, self.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, password: bytes | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """Write a CA, a server certificate (127.0.0.1, localhost) and a client certificate."""
    ca_key, ca_cert = _ca("formcraftd test CA")
    server_key, server_cert = _leaf(
        ca_key,
        ca_cert,
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client_key, client_cert = _leaf(
        ca_key, ca_cert, CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    _other_key, other_cert = _ca("some other CA")
    pki = Pki(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca_cert=folder / "other-ca.pem",
        encrypted_client_key=folder / "client-encrypted.key",
    )
    _write_cert(ca_cert, pki.ca_cert)
    _write_cert(server_cert, pki.server_cert)
    _write_key(server_key, pki.server_key)
    _write_cert(client_cert, pki.client_cert)
    _write_key(client_key, pki.client_key)
    _write_cert(other_cert, pki.other_ca_cert)
    _write_key(client_key, pki.encrypted_client_key, password=b"correct horse")
    return pki


@contextlib.asynccontextmanager
async def serving(
    dispatch: Callable[[web.Request], Awaitable[web.StreamResponse]],
    host: str = "127.0.0.1",
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """An aiohttp server answering every path with `dispatch`; yields its port.

    On the way out, connections still open are aborted and waited for: after
    cleanup an SSL connection waits for its peer's close_notify (relayed by a
    proxy, it may come late), and a test's event loop may be gone by then.
    """
    transports: dict[asyncio.BaseTransport, Any] = {}  # each with its socket

    async def tracked(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            transports[request.transport] = request.transport.get_extra_info("socket")
        return await dispatch(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", tracked)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0, ssl_context=ssl_context).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
        for transport in transports:
            transport.abort()
        await _closed([sock for sock in transports.values() if sock is not None])


async def _closed(sockets: list[Any], timeout_s: float = 5.0) -> None:
    """Wait until every socket is closed (aborted transports close theirs on the next turn)."""
    deadline = time.monotonic() + timeout_s
    while any(sock.fileno() != -1 for sock in sockets):
        if time.monotonic() > deadline:
            raise AssertionError("a receiver connection did not close")
        await asyncio.sleep(0.01)
