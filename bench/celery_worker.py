"""The usual alternative, for webhook_throughput.py: a Celery worker whose task POSTs with requests.

The app talks to the same local RabbitMQ and uses only uniquely named entities
(its task queue and exchange, its event and control exchanges), which the
benchmark deletes afterwards. The task does what the bare consumer does: POST
the body and succeed on any answer; each pool thread keeps one
`requests.Session`, so connections are reused as in the other contenders
(a plain `requests.post` per task, with a new connection every time, is
slower still). Late acks (after the task, like formcraftd's) and a prefetch
of 2 x concurrency (`worker_prefetch_multiplier = 2`), like the others.

The worker runs as
    celery --workdir bench -A celery_worker:app worker --pool threads --concurrency 64
        -Q <queue> --without-heartbeat --without-gossip --without-mingle -l warning
with FORMCRAFTD_BENCH_CELERY_PREFIX naming its entities; celery, kombu and
requests come from the `bench` extra and are never runtime dependencies.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
import requests
from celery import Celery
from kombu import Exchange, Queue
from kombu.utils.json import dumps

TASK = "formcraftd_bench.post"
PREFIX_ENV = "FORMCRAFTD_BENCH_CELERY_PREFIX"
URL_ENV = "FORMCRAFTD_BENCH_AMQP_URL"


@dataclass(frozen=True)
class Names:
    """Every broker entity the Celery app may declare, under one unique prefix."""

    prefix: str

    @classmethod
    def unique(cls) -> Names:
        return cls(f"bench.{uuid.uuid4().hex[:10]}")

    @property
    def queue(self) -> str:  # the task queue, its direct exchange and routing key
        return f"{self.prefix}.celery"

    @property
    def events(self) -> str:
        return f"{self.prefix}.celeryev"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    def queues(self) -> list[str]:
        return [self.queue]

    def exchanges(self) -> list[str]:
        return [
            self.queue,
            self.events,
            f"{self.control}.pidbox",
            f"reply.{self.control}.pidbox",
        ]


_local = threading.local()


def post(url: str, body: str) -> int:
    """POST `body` as JSON over this thread's keep-alive session; the status."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    response = session.post(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, timeout=30
    )
    return response.status_code


def make_app(names: Names, broker_url: str) -> Celery:
    app = Celery("formcraftd_bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=names.queue,
        task_default_exchange=names.queue,
        task_default_routing_key=names.queue,
        task_queues=[Queue(names.queue, Exchange(names.queue, type="direct"), names.queue)],
        task_create_missing_queues=False,
        task_acks_late=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=2,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        event_exchange=names.events,
        control_exchange=names.control,
        broker_connection_retry_on_startup=True,
    )
    app.task(name=TASK, ignore_result=True, acks_late=True)(post)
    return app


def task_message(app: Celery, url: str, body: bytes) -> aio_pika.Message:
    """The Celery protocol 2 message `post.apply_async((url, body))` would publish."""
    task_id = str(uuid.uuid4())
    headers, properties, payload, _ = app.amqp.as_task_v2(
        task_id, TASK, args=(url, body.decode()), kwargs={}, ignore_result=True, origin="bench"
    )
    return aio_pika.Message(
        dumps(payload).encode(),
        headers=_amqp_table(headers),
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=properties["correlation_id"],
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=0,
    )


def _amqp_table(value: Any) -> Any:
    """Celery's headers as an AMQP table: tuples become lists."""
    if isinstance(value, dict):
        return {key: _amqp_table(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_amqp_table(item) for item in value]
    return value


async def declare(names: Names, broker_url: str) -> None:
    """Declare the task queue as Celery would, so that it can be filled before the worker starts."""
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            names.queue, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(names.queue, durable=True)
        await queue.bind(exchange, names.queue)
    finally:
        await connection.close()


def command(names: Names, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "--workdir",
        os.path.dirname(os.path.abspath(__file__)),
        "-A",
        "celery_worker:app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "-Q",
        names.queue,
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "warning",
        "-n",
        f"{names.prefix}@%h",
    ]


def env(names: Names, broker_url: str) -> dict[str, str]:
    return {PREFIX_ENV: names.prefix, URL_ENV: broker_url}


# `celery -A celery_worker:app` imports this module with the prefix in the environment.
app = (
    make_app(Names(os.environ[PREFIX_ENV]), os.environ[URL_ENV])
    if PREFIX_ENV in os.environ and URL_ENV in os.environ
    else None
)
