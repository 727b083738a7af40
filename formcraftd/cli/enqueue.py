"""`formcraftd enqueue`: validate a job file and publish it, within a timeout."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import msgspec

from formcraftd.cli.common import EXIT_OK, fail, load_config, quiet_connection_logs
from formcraftd.core import config, jobs
from formcraftd.core.errors import BrokerUnreachable
from formcraftd.core.redaction import mask_url

if TYPE_CHECKING:
    from formcraftd.amqp.connection import Broker

ENQUEUE_TIMEOUT_S = 10.0


def cmd_enqueue(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        return fail(f"{args.file}: {exc.strerror or exc}")
    try:
        job = jobs.decode(body)
    except jobs.JobInvalid as exc:
        return fail(f"{args.file}: invalid job: {exc}")
    kind = jobs.kind_of(job)
    worker = cfg.worker(kind)
    if args.priority and not worker.max_priority and cfg.broker.queue_type == "classic":
        print(
            f"formcraftd: warning: workers.{kind}.max_priority is 0, so {worker.queue} "
            f"takes no priorities: --priority {args.priority} changes nothing there",
            file=sys.stderr,
        )
    job_id = uuid.uuid4().hex
    quiet_connection_logs()
    asyncio.run(
        _publish(cfg, worker.queue, body, job_id, timeout_s=args.timeout, priority=args.priority)
    )
    print(f"{job_id} -> {worker.queue}")
    return EXIT_OK


async def _publish(
    cfg: config.Config,
    queue: str,
    body: bytes,
    job_id: str,
    *,
    timeout_s: float,
    priority: int | None = None,
) -> None:
    """Connect, declare, publish and wait for the confirm, all within `timeout_s`."""
    from formcraftd.amqp.connection import Broker

    broker_config = msgspec.structs.replace(
        cfg.broker, connect_timeout_s=min(cfg.broker.connect_timeout_s, timeout_s)
    )
    broker = Broker(broker_config)
    connected = False
    try:
        async with asyncio.timeout(timeout_s):
            await broker.connect()
            connected = True
            await _declare_and_publish(cfg, broker, queue, body, job_id, priority=priority)
    except TimeoutError:
        if not connected:
            nodes = ", ".join(mask_url(u.strip()) for u in cfg.broker.url.split(",") if u.strip())
            raise BrokerUnreachable(
                f"broker not reachable within {timeout_s:g} s: {nodes}"
            ) from None
        raise BrokerUnreachable(
            f"the broker did not confirm the job within {timeout_s:g} s; "
            "it may or may not have been queued"
        ) from None
    finally:
        await broker.aclose()


async def _declare_and_publish(
    cfg: config.Config,
    broker: Broker,
    queue: str,
    body: bytes,
    job_id: str,
    *,
    priority: int | None,
) -> None:
    from formcraftd.amqp.topology import WorkerTopology

    kind = next(k for k in config.WORKER_KINDS if cfg.worker(k).queue == queue)
    await broker.declare(WorkerTopology.build(cfg.worker(kind), cfg.broker))
    channel = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=job_id,
        priority=priority,
    )
    await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
