"""The egress proxy, through a real proxy server (proxy.py) on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from formcraftd.core.config import WebhookWorkerConfig, parse
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.egress import EgressProxy
from tests.workers.webhook.pki import Pki, make_pki, serving
from tests.workers.webhook.support import LOOPBACK_ONLY, Receiver, ctx, job, started_handler

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(30)]

PROXY_USER = "formcraftd"
PROXY_PASSWORD = "pr0xy-s3cret-pw"
FILTERED_HOST = "127.0.0.3"  # the proxy refuses to connect there (418), as a policy would
START_TIMEOUT_S = 20.0


@dataclass
class ProxyServer:
    """A running proxy.py: basic auth required, FILTERED_HOST refused, an access log."""

    port: int
    log: Path

    def url(self, *, credentials: bool = True, host: str = "127.0.0.1") -> str:
        userinfo = f"{PROXY_USER}:{PROXY_PASSWORD}@" if credentials else ""
        return f"http://{userinfo}{host}:{self.port}"

    async def wait_for_access(self, words: str, timeout_s: float = 5.0) -> str:
        """The first access-log line with `words`; proxy.py logs a connection when it closes."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
                if "access_log" in line and words in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log line with {words!r} in {timeout_s} s")
            await asyncio.sleep(0.05)

    def access_lines(self) -> list[str]:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if "access_log" in line]


def free_port() -> int:
    """A loopback port that nothing listens on (closed right after it was picked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def proxy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """proxy.py on 127.0.0.1 for the module; stopped at the end."""
    folder = tmp_path_factory.mktemp("proxy")
    port_file, log = folder / "port", folder / "proxy.log"
    command = [
        sys.executable, "-m", "proxy",
        "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--num-workers", "1", "--num-acceptors", "1",
        "--log-file", str(log), "--log-level", "INFO",
        "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}",
        "--plugins", "proxy.plugin.FilterByUpstreamHostPlugin",
        "--filtered-upstream-hosts", FILTERED_HOST,
    ]  # fmt: skip
    # proxy.py keeps its data in ~/.proxy: a HOME of its own keeps the real one clean.
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(folder)},
    )
    try:
        yield ProxyServer(_wait_until_listening(process, port_file), log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_until_listening(process: subprocess.Popen[bytes], port_file: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy.py exited with {process.returncode}")
        text = port_file.read_text() if port_file.exists() else ""
        if text.strip().isdigit():
            port = int(text)
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return port
        time.sleep(0.05)
    raise RuntimeError(f"proxy.py did not listen within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _serve(recv: Receiver, host: str, pki: Pki | None = None) -> AsyncIterator[Receiver]:
    context = pki.server_context() if pki else None
    async with serving(recv.dispatch, host, context) as port:
        recv.port = port
        yield recv


@pytest.fixture
async def other_receiver() -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.2, so that 127.0.0.1 (the proxy) can stay outside allowed_networks."""
    async for recv in _serve(Receiver(), "127.0.0.2"):
        yield recv


@pytest.fixture
async def tls_receiver(pki: Pki) -> AsyncIterator[Receiver]:
    """An HTTPS receiver on 127.0.0.1 that requires the test client certificate."""
    async for recv in _serve(Receiver(), "127.0.0.1", pki):
        yield recv


def config(proxy_url: str, **overrides: object) -> WebhookWorkerConfig:
    settings: dict[str, object] = {
        "allowed_networks": LOOPBACK_ONLY,
        "timeout_ms": 5000,
        "proxy_url": proxy_url,
    }
    return WebhookWorkerConfig(**(settings | overrides))  # type: ignore[arg-type]


async def deliver(settings: WebhookWorkerConfig, url: str) -> None:
    handler: WebhookHandler = await started_handler(settings)
    try:
        await handler.handle(job(url, body={"a": 1}), ctx())
    finally:
        await handler.aclose()


async def failure(settings: WebhookWorkerConfig, url: str) -> RetryLater | PermanentFailure:
    with pytest.raises((RetryLater, PermanentFailure)) as caught:
        await deliver(settings, url)
    error = caught.value
    assert PROXY_PASSWORD not in str(error)
    return error


# --- through the proxy ---------------------------------------------------------------


async def test_plain_http_is_forwarded_by_the_proxy(
    proxy_server: ProxyServer, receiver: Receiver
) -> None:
    """An http:// webhook reaches the receiver, and the proxy logged forwarding it."""
    await deliver(config(proxy_server.url()), receiver.url("/via-proxy"))
    assert [seen.path for seen in receiver.seen] == ["/via-proxy"]
    await proxy_server.wait_for_access(f"POST 127.0.0.1:{receiver.port}/via-proxy")


async def test_https_is_tunnelled_with_connect_and_keeps_its_tls_settings(
    proxy_server: ProxyServer, tls_receiver: Receiver, pki: Pki
) -> None:
    """An https:// webhook goes through a CONNECT tunnel, with the host's client certificate."""
    entry = pki.client_entry()
    url = f"https://127.0.0.1:{tls_receiver.port}/tunnelled"
    await deliver(config(proxy_server.url(), tls=(entry,)), url)
    assert [seen.path for seen in tls_receiver.seen] == ["/tunnelled"]
    # The receiver requires the client certificate: the request arrived, so it was presented.
    await proxy_server.wait_for_access(f"CONNECT 127.0.0.1:{tls_receiver.port}")


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_proxy_credentials_never_reach_the_destination(
    proxy_server: ProxyServer, receiver: Receiver, tls_receiver: Receiver, pki: Pki, scheme: str
) -> None:
    """Several jobs through one handler pass the proxy's authentication, which stays there.

    proxy.py strips Proxy-Authorization only from the first request of a
    connection, so plain http gets a fresh proxy connection per request.
    """
    entry = pki.client_entry()
    target = receiver if scheme == "http" else tls_receiver
    handler = await started_handler(config(proxy_server.url(), tls=(entry,)))
    try:
        for n in range(3):
            await handler.handle(job(f"{scheme}://127.0.0.1:{target.port}/n{n}"), ctx())
    finally:
        await handler.aclose()
    assert [seen.path for seen in target.seen] == ["/n0", "/n1", "/n2"]
    assert all("Proxy-Authorization" not in seen.headers for seen in target.seen)


async def test_a_reload_turns_the_proxy_on_and_off(
    proxy_server: ProxyServer, receiver: Receiver
) -> None:
    """reconfigure() with a proxy_url routes the next job through it; without, direct again."""
    direct = WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=5000)
    handler = await started_handler(direct)
    try:
        await handler.handle(job(receiver.url("/direct-1")), ctx())
        handler.reconfigure(config(proxy_server.url()))
        await handler.handle(job(receiver.url("/proxied")), ctx())
        handler.reconfigure(direct)
        await handler.handle(job(receiver.url("/direct-2")), ctx())
    finally:
        await handler.aclose()
    assert [seen.path for seen in receiver.seen] == ["/direct-1", "/proxied", "/direct-2"]
    await proxy_server.wait_for_access(f"127.0.0.1:{receiver.port}/proxied")
    assert not any("/direct-" in line for line in proxy_server.access_lines())


@pytest.mark.parametrize(("status", "fate"), [(404, PermanentFailure), (503, RetryLater)])
async def test_the_destinations_answer_keeps_its_code(
    proxy_server: ProxyServer, receiver: Receiver, status: int, fate: type[Exception]
) -> None:
    """A status the destination sent through the proxy is HTTP_STATUS, as without a proxy."""

    async def answer(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="nope")

    receiver.behaviour = answer
    error = await failure(config(proxy_server.url()), receiver.url())
    assert isinstance(error, fate)
    assert error.code == "HTTP_STATUS"
    assert error.status == status


# --- the proxy's own failures: PROXY_ERROR, retried -------------------------------------


async def test_a_proxy_that_is_down_is_a_proxy_error(receiver: Receiver) -> None:
    """Nothing listens at proxy_url: PROXY_ERROR, retried; the receiver sees nothing."""
    error = await failure(
        config(f"http://u:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"), receiver.url()
    )
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"
    assert "egress proxy" in str(error)
    assert not error.counts_for_breaker  # the destination is not to blame
    assert receiver.seen == []


async def test_a_proxy_name_that_does_not_resolve_is_a_proxy_error(receiver: Receiver) -> None:
    """A proxy host name that does not resolve is the proxy's failure, not the destination's."""
    error = await failure(config("http://proxy.invalid:3128"), receiver.url())
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"


async def test_a_refused_connect_is_a_proxy_error(proxy_server: ProxyServer) -> None:
    """The proxy refuses the CONNECT of an https destination (a policy, as Smokescreen's)."""
    settings = config(proxy_server.url(), allowed_networks=("127.0.0.0/8",))
    error = await failure(settings, f"https://{FILTERED_HOST}:{free_port()}/hook")
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"
    assert "answered 418 to CONNECT" in str(error)
    assert not error.counts_for_breaker


async def test_a_connect_to_a_dead_destination_is_a_proxy_error(
    proxy_server: ProxyServer,
) -> None:
    """Through a tunnel, only the proxy answers (502): PROXY_ERROR."""
    error = await failure(config(proxy_server.url()), f"https://127.0.0.1:{free_port()}/hook")
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"


async def test_a_proxy_written_error_for_plain_http_is_a_proxy_error(
    proxy_server: ProxyServer,
) -> None:
    """proxy.py's own 502 (marked Proxy-agent) for an unreachable http:// destination."""
    error = await failure(config(proxy_server.url()), f"http://127.0.0.1:{free_port()}/hook")
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"
    assert error.status == 502
    assert not error.counts_for_breaker


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_missing_proxy_credentials_are_a_proxy_error(
    proxy_server: ProxyServer, receiver: Receiver, scheme: str
) -> None:
    """The proxy's 407 (to the request, or to CONNECT) is PROXY_ERROR, never HTTP_STATUS."""
    url = f"{scheme}://127.0.0.1:{receiver.port}/hook"
    error = await failure(config(proxy_server.url(credentials=False)), url)
    assert isinstance(error, RetryLater)
    assert error.code == "PROXY_ERROR"
    assert receiver.seen == []


# --- no_proxy and the environment --------------------------------------------------------


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "*"])
async def test_a_no_proxy_destination_goes_direct(receiver: Receiver, entry: str) -> None:
    """With the proxy down, a destination in no_proxy is still delivered (it went direct)."""
    settings = config(f"http://127.0.0.1:{free_port()}", no_proxy=(entry,))
    await deliver(settings, receiver.url())
    assert len(receiver.seen) == 1


async def test_proxy_variables_in_the_environment_are_ignored(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY and friends pointing at nothing change nothing: only proxy_url counts."""
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    await deliver(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY), receiver.url())
    assert len(receiver.seen) == 1


# --- the SSRF guard with a proxy ---------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_private_destination_is_refused_before_the_proxy(
    proxy_server: ProxyServer, receiver: Receiver, host: str
) -> None:
    """The guard still refuses loopback destinations (looked up first, or IP literals)."""
    settings = config(proxy_server.url(), allowed_networks=())
    error = await failure(settings, receiver.url(host=host))
    assert isinstance(error, PermanentFailure)
    assert error.code == "SSRF_BLOCKED"
    assert receiver.seen == []


async def test_the_proxy_itself_is_not_checked_by_the_guard(
    proxy_server: ProxyServer, other_receiver: Receiver
) -> None:
    """A proxy named `localhost` (127.0.0.1, not allowed) is used; the destination is allowed."""
    settings = config(proxy_server.url(host="localhost"), allowed_networks=("127.0.0.2/32",))
    await deliver(settings, other_receiver.url(host="127.0.0.2"))
    assert len(other_receiver.seen) == 1


async def test_the_proxy_exemption_does_not_cover_direct_requests(
    proxy_server: ProxyServer, receiver: Receiver
) -> None:
    """A no_proxy destination on the proxy's host is checked like any other."""
    settings = config(
        proxy_server.url(host="localhost"), allowed_networks=(), no_proxy=("localhost",)
    )
    error = await failure(settings, receiver.url(host="localhost"))
    assert error.code == "SSRF_BLOCKED"


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "https://proxy.example:3128",
        "socks5://proxy.example:1080",
        "proxy.example:3128",
        "http://:3128",
        "http://proxy.example:99999",
        "http://proxy.example:3128/path",
    ],
)
def test_a_bad_proxy_url_is_refused_without_quoting_it(value: str) -> None:
    """Only http://host[:port] proxies; the error names the key and never quotes the URL."""
    text = (
        f"[workers.webhook]\nproxy_url = '{value.replace('//', '//u:' + PROXY_PASSWORD + '@')}'\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, source="c.toml", environ={})
    assert str(caught.value).startswith("c.toml: key workers.webhook.proxy_url: ")
    assert PROXY_PASSWORD not in str(caught.value)


@pytest.mark.parametrize("entry", ["a..b", "-bad.example", "host:port", "10.0.0.0/33", ""])
def test_a_bad_no_proxy_entry_is_a_config_error(entry: str) -> None:
    """The worker's check (check-config, start, reload) names the entry's key."""
    with pytest.raises(ConfigError, match=r"^key workers\.webhook\.no_proxy\[1\]: "):
        WebhookHandler.check(WebhookWorkerConfig(no_proxy=("ok.example", entry)))


def test_check_config_masks_the_proxy_password() -> None:
    """masked() keeps the proxy's host and user but hides its password."""
    loaded = parse(
        f"[workers.webhook]\nproxy_url = 'http://egress:{PROXY_PASSWORD}@proxy.internal:4750'\n",
        environ={},
    )
    masked = loaded.masked()["workers"]["webhook"]["proxy_url"]
    assert masked == "http://egress:***@proxy.internal:4750"


@pytest.mark.parametrize(
    ("entries", "host", "port", "proxied"),
    [
        (("hooks.example.com",), "hooks.example.com", 443, False),
        (("hooks.example.com",), "a.hooks.example.com", 443, False),
        (("hooks.example.com",), "xhooks.example.com", 443, True),
        ((".example.com",), "example.com", 443, True),
        ((".example.com",), "a.example.com", 80, False),
        (("Hooks.Example.com.",), "HOOKS.example.com.", 443, False),
        (("hooks.example.com:8443",), "hooks.example.com", 443, True),
        (("hooks.example.com:8443",), "hooks.example.com", 8443, False),
        (("10.0.0.0/8",), "10.1.2.3", 80, False),
        (("10.0.0.0/8",), "11.1.2.3", 80, True),
        (("10.0.0.0/8",), "ten.example", 80, True),
        (("10.1.2.3",), "10.1.2.3", 80, False),
        (("10.1.2.3:80",), "10.1.2.3", 443, True),
        (("[2001:db8::1]:443",), "2001:db8::1", 443, False),
        (("2001:db8::/32",), "2001:db8::5", 443, False),
        (("2001:db8::/32",), "10.0.0.1", 443, True),
        ((), "anything.example", 443, True),
        (("*",), "anything.example", 443, False),
    ],
)
def test_no_proxy_matching(entries: tuple[str, ...], host: str, port: int, proxied: bool) -> None:
    """Host and subdomains, .suffix, optional port, IPs and CIDRs for IP literals, `*`."""
    proxy = EgressProxy.from_config(
        WebhookWorkerConfig(proxy_url="http://proxy.internal:4750", no_proxy=entries)
    )
    assert proxy is not None
    assert proxy.used_for(host, port) is proxied


def test_the_proxy_credentials_stay_out_of_reprs() -> None:
    """The settings' repr (a debugging aid) never shows the proxy password."""
    proxy = EgressProxy.from_config(
        WebhookWorkerConfig(proxy_url=f"http://u:{PROXY_PASSWORD}@proxy.internal:4750")
    )
    assert PROXY_PASSWORD not in repr(proxy)
