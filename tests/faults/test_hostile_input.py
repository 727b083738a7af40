"""Hostile bodies at every consumer: each ends in the DLQ as VALIDATION_ERROR, nothing breaks.

Hypothesis generates the bodies; the daemon runs in its own thread and event
loop for the whole module, so each example is one publish and one dead letter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aio_pika
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formcraftd.core.config import Config
from formcraftd.daemon import Daemon
from tests.support import AMQP_URL, Broker, Names, make_config

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(600)]

T = TypeVar("T")
MAX_BYTES = 64 * 1024

VALID: dict[str, dict[str, Any]] = {
    "webhook": {
        "type": "webhook.send",
        "payload": {
            "url": "https://example.com/hook",
            "method": "POST",
            "headers": {},
            "body": {"a": 1},
            "secret": "s",
        },
        "metadata": {"formId": "f", "submissionId": "s", "retryCount": 0},
    },
    "email": {
        "type": "email.send",
        "payload": {
            "to": ["a@example.com"],
            "subject": "Hi",
            "template": "submission-receipt",
            "data": {},
        },
        "metadata": {"formId": "f", "submissionId": "s"},
    },
    "sheets": {
        "type": "sheets.update",
        "payload": {
            "spreadsheetId": "abc",
            "range": "A1",
            "values": [[1]],
            "auth": {"access_token": "t", "refresh_token": "r", "expiry_date": 0},
        },
        "metadata": {"formId": "f", "submissionId": "s"},
    },
}


class DaemonThread:
    """A daemon running in its own thread, driven from synchronous test code."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon = Daemon(cfg)
        self.task: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            self.daemon.run(), self.loop
        )
        self.run(asyncio.wait_for(self.daemon.started.wait(), 30))
        self.amqp = Broker(self.run(aio_pika.connect_robust(AMQP_URL)))
        self.amqp.track(cfg)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.request_shutdown)
        self.task.result(60)
        self.run(self.amqp.cleanup())
        self.run(self.amqp.connection.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running() -> Iterator[DaemonThread]:
    """Every worker enabled, on unique queues, with a 64 KiB message limit."""
    names = Names()
    cfg = make_config(
        names,
        daemon={"max_message_bytes": MAX_BYTES},
        email={"enabled": True, "smtp_port": 1},
        sheets={
            "enabled": True,
            "api_root_url": "http://127.0.0.1:1/",
            "token_url": "http://127.0.0.1:1/token",
        },
    )
    thread = DaemonThread(cfg)
    yield thread
    thread.stop()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


REQUIRED = {"webhook": "url", "email": "to", "sheets": "auth"}
OTHER = {"webhook": "email", "email": "sheets", "sheets": "webhook"}
MUTATIONS = [
    "drop-required-field",
    "wrong-type",
    "unknown-type",
    "huge-string",
    "deep-nesting",
    "invalid-utf8",
    "crlf-header",
    "huge-values",
    "other-kind",
]


def mutate(kind: str, how: str, value: Any) -> bytes:
    """A job for `kind`'s queue, broken in one way that makes it invalid there."""
    job = orjson.loads(orjson.dumps(VALID[kind]))
    if how == "drop-required-field":
        del job["payload"][REQUIRED[kind]]
    elif how == "wrong-type":
        job["metadata"]["formId"] = value if not isinstance(value, str) else [value]
    elif how == "unknown-type":
        job["type"] = "fax.send"
    elif how == "huge-string":
        job["metadata"]["formId"] = "x" * (1024 * 1024)
    elif how == "deep-nesting":
        text = orjson.dumps(job).replace(b'"formId":"f"', b'"formId":' + b"[" * 5000 + b"]" * 5000)
        return text
    elif how == "invalid-utf8":
        return orjson.dumps(job).replace(b'"formId":"f"', b'"formId":"\xc3\x28"')
    elif how == "crlf-header":
        job = orjson.loads(orjson.dumps(VALID["webhook"]))
        job["payload"]["headers"] = {"X-A": "a\r\nInjected: yes"}
        if kind != "webhook":
            job["metadata"]["formId"] = 1  # invalid there anyway; keep it invalid everywhere
    elif how == "huge-values":
        job = orjson.loads(orjson.dumps(VALID["sheets"]))
        job["payload"]["values"] = [[1]] * 20000
    elif how == "other-kind":
        job = orjson.loads(orjson.dumps(VALID[OTHER[kind]]))
    return orjson.dumps(job)


def hostile_bodies(kind: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2048),
        json_values.map(orjson.dumps),
        st.tuples(st.sampled_from(MUTATIONS), json_values).map(lambda t: mutate(kind, *t)),
    )


@pytest.mark.parametrize("kind", ["webhook", "email", "sheets"])
def test_hostile_bodies_are_dead_lettered_and_the_daemon_stays_healthy(
    kind: str, running: DaemonThread
) -> None:
    """Random bytes, wrong shapes, huge and deep bodies: all VALIDATION_ERROR, memory bounded."""
    queue = running.cfg.worker(kind).queue  # type: ignore[arg-type]
    dlq = f"dlq.{queue}"
    start_rss = rss_bytes()
    seen = 0

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=hostile_bodies(kind))
    def one(body: bytes) -> None:
        nonlocal seen
        job_id = uuid.uuid4().hex
        running.run(running.amqp.publish(queue, body, message_id=job_id))
        [dead] = running.run(running.amqp.take(dlq, 1, timeout=20))
        assert dead.message_id == job_id
        assert dead.headers["x-formcraft-error-code"] == "VALIDATION_ERROR", dead.headers
        assert dead.body == body
        seen += 1

    one()
    healthy, body = running.daemon.health()
    assert healthy, body
    assert seen >= 100
    growth = rss_bytes() - start_rss
    assert growth < 150 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MiB"
