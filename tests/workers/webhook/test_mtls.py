"""Client certificates and private CAs per destination, against loopback mTLS receivers."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from formcraftd.core.config import WebhookTlsConfig, WebhookWorkerConfig, parse
from formcraftd.core.errors import ConfigError, RetryLater
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.tls import TlsContexts
from tests.workers.webhook.pki import CLIENT_NAME, Pki, make_pki, serving
from tests.workers.webhook.support import LOOPBACK_ONLY, ctx, job, started_handler

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(20)]


@dataclass
class TlsReceiver:
    """An HTTPS receiver on 127.0.0.1 that requires a client certificate from the test CA."""

    port: int = 0
    clients: list[str] = field(default_factory=list)  # the common name of each request's client

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}/hook"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peercert")
        subject = dict(item[0] for item in peer["subject"])
        self.clients.append(subject["commonName"])
        return web.Response(text="ok")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The CA, server and client certificates, made once for the module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _serve(pki: Pki, max_version: ssl.TLSVersion) -> AsyncIterator[TlsReceiver]:
    recv = TlsReceiver()
    context = pki.server_context()
    context.maximum_version = max_version
    async with serving(recv.dispatch, "127.0.0.1", context) as port:
        recv.port = port
        yield recv


@pytest.fixture
async def tls_receiver(pki: Pki) -> AsyncIterator[TlsReceiver]:
    """A running mTLS receiver (TLS 1.3); stopped after the test."""
    async for recv in _serve(pki, ssl.TLSVersion.TLSv1_3):
        yield recv


@pytest.fixture
async def tls12_receiver(pki: Pki) -> AsyncIterator[TlsReceiver]:
    """The same receiver limited to TLS 1.2: the client certificate is part of the handshake."""
    async for recv in _serve(pki, ssl.TLSVersion.TLSv1_2):
        yield recv


@contextlib.contextmanager
def alerting_receiver(pki: Pki, version: ssl.TLSVersion) -> Iterator[int]:
    """A server (blocking OpenSSL, in a thread) that refuses a missing client certificate
    with a TLS alert, as common servers do; yields its port.

    aiohttp's own server drops the connection instead of sending the alert.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    context = pki.server_context()
    context.maximum_version = version
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1024)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def config_with(*entries: WebhookTlsConfig) -> WebhookWorkerConfig:
    return WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=3000, tls=entries)


async def deliver(config: WebhookWorkerConfig, url: str) -> None:
    handler = await started_handler(config)
    try:
        await handler.handle(job(url, body={"a": 1}), ctx())
    finally:
        await handler.aclose()


async def test_client_certificate_and_private_ca_deliver(
    pki: Pki, tls_receiver: TlsReceiver
) -> None:
    """With the entry's client certificate and CA bundle, the mTLS receiver gets the request."""
    entry = pki.client_entry()
    await deliver(config_with(entry), tls_receiver.url())
    assert tls_receiver.clients == [CLIENT_NAME]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_without_a_client_certificate_the_receiver_refuses(
    pki: Pki, version: ssl.TLSVersion
) -> None:
    """The private CA alone gets past the server check, but the receiver's alert is TLS_ERROR.

    TLS 1.2 refuses in the handshake; TLS 1.3 after it, on the first read.
    """
    entry = WebhookTlsConfig(host="127.0.0.1", ca_file=str(pki.ca_cert))
    with alerting_receiver(pki, version) as port, pytest.raises(RetryLater) as caught:
        await deliver(config_with(entry), f"https://127.0.0.1:{port}/hook")
    assert caught.value.code == "TLS_ERROR"


async def test_client_certificate_works_over_tls12(pki: Pki, tls12_receiver: TlsReceiver) -> None:
    """The client certificate is presented in a TLS 1.2 handshake too."""
    entry = pki.client_entry()
    await deliver(config_with(entry), tls12_receiver.url())
    assert tls12_receiver.clients == [CLIENT_NAME]


async def test_without_the_private_ca_the_server_is_not_trusted(
    pki: Pki, tls_receiver: TlsReceiver
) -> None:
    """With no entry for the host, the system CAs do not know the test CA: TLS_ERROR."""
    with pytest.raises(RetryLater) as caught:
        await deliver(config_with(), tls_receiver.url())
    assert caught.value.code == "TLS_ERROR"


async def test_another_ca_bundle_does_not_trust_the_server(
    pki: Pki, tls_receiver: TlsReceiver
) -> None:
    """ca_file replaces the trusted CAs: a bundle without the server's CA fails the check."""
    entry = pki.client_entry(ca_file=pki.other_ca_cert)
    with pytest.raises(RetryLater) as caught:
        await deliver(config_with(entry), tls_receiver.url())
    assert caught.value.code == "TLS_ERROR"


async def test_an_entry_for_another_host_is_not_used(pki: Pki, tls_receiver: TlsReceiver) -> None:
    """The entry of another host leaves this one with the defaults (and so no client cert)."""
    entry = pki.client_entry("hooks.example.com")
    with pytest.raises(RetryLater) as caught:
        await deliver(config_with(entry), tls_receiver.url())
    assert caught.value.code == "TLS_ERROR"
    assert tls_receiver.clients == []


async def test_a_reload_adds_the_client_certificate(pki: Pki, tls_receiver: TlsReceiver) -> None:
    """reconfigure() swaps in a new entry; the next request presents the certificate."""
    handler: WebhookHandler = await started_handler(config_with())
    try:
        with pytest.raises(RetryLater):
            await handler.handle(job(tls_receiver.url()), ctx())
        entry = pki.client_entry()
        handler.reconfigure(config_with(entry))
        await handler.handle(job(tls_receiver.url()), ctx())
    finally:
        await handler.aclose()
    assert tls_receiver.clients == [CLIENT_NAME]


def test_exact_host_wins_over_the_longest_pattern(pki: Pki) -> None:
    """An exact entry beats patterns, the longest pattern wins, a bare domain is not covered."""
    contexts = TlsContexts.from_config(
        WebhookWorkerConfig(
            tls=(
                WebhookTlsConfig(host="*.example.com", ca_file=str(pki.ca_cert)),
                WebhookTlsConfig(host="*.eu.example.com", ca_file=str(pki.ca_cert)),
                WebhookTlsConfig(host="hooks.eu.example.com", ca_file=str(pki.ca_cert)),
            )
        )
    )
    exact = contexts.for_host("hooks.eu.example.com")
    narrow = contexts.for_host("a.eu.example.com")  # *.eu.example.com, not *.example.com
    wide = contexts.for_host("a.b.example.com")  # only *.example.com covers it
    assert None not in (exact, narrow, wide)
    assert len({id(exact), id(narrow), id(wide)}) == 3  # each entry has its own context
    assert contexts.for_host("HOOKS.eu.example.com.") is exact
    assert contexts.for_host("example.com") is None
    assert contexts.for_host("notexample.com") is None


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ({"ca_file": "missing.pem"}, "workers.webhook.tls[0].ca_file", "No such file"),
        ({"client_cert": "missing.pem"}, "workers.webhook.tls[0].client_cert", "No such file"),
        ({"client_cert": "{client_cert}", "client_key": "{ca_cert}"}, "tls[0].client_key", ""),
        (
            {"client_cert": "{client_cert}", "client_key": "{encrypted_client_key}"},
            "workers.webhook.tls[0].client_key",
            "",
        ),
    ],
)
def test_an_unusable_file_is_a_config_error_naming_the_key(
    pki: Pki, entry: dict[str, str], key: str, words: str
) -> None:
    """A missing file, a key that does not match, an encrypted key: one line naming the key."""
    fields = {name: value.format(**vars(pki)) for name, value in entry.items()}
    config = WebhookWorkerConfig(tls=(WebhookTlsConfig(host="hooks.example.com", **fields),))
    with pytest.raises(ConfigError) as caught:
        WebhookHandler.check(config)
    message = str(caught.value)
    assert f"key {key}" in message or key in message
    assert words in message
    assert "\n" not in message
    assert "correct horse" not in message


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """client_cert, client_key and ca_file resolve against the config file's folder."""
    config = parse(
        "[[workers.webhook.tls]]\nhost = '*.example.com'\n"
        "client_cert = 'certs/c.pem'\nclient_key = 'certs/c.key'\nca_file = 'ca.pem'\n",
        base_dir=tmp_path,
        environ={},
    )
    (entry,) = config.workers.webhook.tls
    assert entry.client_cert == str(tmp_path / "certs" / "c.pem")
    assert entry.client_key == str(tmp_path / "certs" / "c.key")
    assert entry.ca_file == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host = 'a..b'\nca_file = 'x'", "key workers.webhook.tls[0].host:"),
        ("host = '*.'\nca_file = 'x'", "key workers.webhook.tls[0].host:"),
        ("host = 'a.example'", "key workers.webhook.tls[0]: give client_cert, ca_file or both"),
        ("host = 'a.example'\nclient_key = 'k'", "key workers.webhook.tls[0]: give"),
        (
            "host = 'a.example'\nca_file = 'x'\nclient_key = 'k'",
            "key workers.webhook.tls[0].client_key: needs client_cert",
        ),
        (
            "host = 'a.example'\nca_file = 'x'\npassword = 'k'",
            "unknown key workers.webhook.tls[0].password",
        ),
    ],
)
def test_a_bad_entry_is_refused_when_the_config_is_read(text: str, message: str) -> None:
    """Entries are checked with the rest of the file, one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse(f"[[workers.webhook.tls]]\n{text}\n", source="c.toml", environ={})
    assert message in str(caught.value)


def test_two_entries_for_one_host_are_refused() -> None:
    """A host may have one entry only (which one would apply is otherwise unclear)."""
    entry = "[[workers.webhook.tls]]\nhost = 'A.example'\nca_file = 'x'\n"
    with pytest.raises(ConfigError, match=r"tls\[1\]\.host: 'a.example' already has an entry"):
        parse(entry + entry.replace("A.example", "a.example"), environ={})
