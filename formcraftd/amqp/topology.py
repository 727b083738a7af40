"""The queue topology of each worker, declared idempotently, and the names in it.

For each enabled worker: `<queue>` (dead-lettering to `<dead_letter_exchange>`),
the dead-letter exchange (fanout) with `dlq.<queue>` bound to it, and one wait
queue `<queue>.retry.<delay_ms>` per delay tier of the retry schedule, each
dead-lettering back to `<queue>` when its TTL runs out. A declaration that
clashes with an existing entity is a :class:`TopologyError` naming the entity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from formcraftd.core.config import AnyWorkerConfig, BrokerConfig
from formcraftd.core.errors import TopologyError
from formcraftd.core.retry import RetrySchedule
from formcraftd.core.text import one_line


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """The name of `queue`'s retry wait queue for `delay_ms`."""
    return f"{queue}.retry.{delay_ms}"


def dead_letter_queue_name(queue: str) -> str:
    """The name of the dead-letter queue of main queue `queue`."""
    return f"dlq.{queue}"


def priority_warning(kind: str, worker: AnyWorkerConfig, broker: BrokerConfig) -> str:
    """Why `max_priority` cannot apply as configured (quorum queues), or ""."""
    if not worker.max_priority or broker.queue_type != "quorum":
        return ""
    return (
        f"workers.{kind}.max_priority = {worker.max_priority}, but {worker.queue} is a quorum "
        "queue, declared without x-max-priority: job priorities need RabbitMQ 4.0 or later, "
        "whose quorum queues have two levels (priority 5 and above goes first, the rest is "
        "normal); earlier versions ignore them"
    )


def main_queue_hint(name: str, main_queues: Iterable[str]) -> str:
    """`; use the main queue name: X` when `name` is the DLQ or a wait queue of X, else ""."""
    for queue in main_queues:
        if name == dead_letter_queue_name(queue) or name.startswith(f"{queue}.retry."):
            return f"; use the main queue name: {queue}"
    return ""


Arguments = dict[str, Any]
_QUORUM_ONLY_ARGUMENTS = (
    "x-queue-type",
    "x-dead-letter-strategy",
    "x-overflow",
    "x-delivery-limit",
)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One queue to declare: name and arguments."""

    name: str
    arguments: Arguments


@dataclass(frozen=True, slots=True)
class WorkerTopology:
    """Every entity one worker needs, derived from its config ."""

    main: QueueSpec
    dead_letter_exchange: str
    dead_letter_queue: QueueSpec
    retry_queues: tuple[QueueSpec, ...]

    @classmethod
    def build(cls, worker: AnyWorkerConfig, broker: BrokerConfig) -> WorkerTopology:
        queue_type = {"x-queue-type": broker.queue_type}
        # Quorum queues dead-letter at most once by default; a dead letter (or a
        # retry leaving its wait queue) could then be lost between nodes.
        safe_dead_lettering: Arguments = (
            {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
            if broker.queue_type == "quorum"
            else {}
        )
        main_args: Arguments = {
            **queue_type,
            "x-dead-letter-exchange": worker.dead_letter_exchange,
            **safe_dead_lettering,
        }
        if broker.queue_type == "quorum":
            main_args["x-delivery-limit"] = broker.delivery_limit
        if getattr(worker, "single_active_consumer", False):
            main_args["x-single-active-consumer"] = True
        if worker.max_priority and broker.queue_type == "classic":
            # Quorum queues take no x-max-priority: before RabbitMQ 4.0 they ignore
            # priorities, from 4.0 on they have two levels whatever the argument.
            main_args["x-max-priority"] = worker.max_priority
        dlq_args: Arguments = dict(queue_type)
        if worker.dead_letter_ttl_ms is not None:
            dlq_args["x-message-ttl"] = worker.dead_letter_ttl_ms
        schedule = RetrySchedule.from_config(worker.retry)
        retries = tuple(
            QueueSpec(
                retry_queue_name(worker.queue, delay),
                {
                    **queue_type,
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": worker.queue,
                    **safe_dead_lettering,
                },
            )
            for delay in schedule.tiers()
        )
        return cls(
            main=QueueSpec(worker.queue, main_args),
            dead_letter_exchange=worker.dead_letter_exchange,
            dead_letter_queue=QueueSpec(dead_letter_queue_name(worker.queue), dlq_args),
            retry_queues=retries,
        )

    def queues(self) -> tuple[QueueSpec, ...]:
        return (self.main, self.dead_letter_queue, *self.retry_queues)


async def declare_topology(channel: AbstractChannel, topology: WorkerTopology) -> None:
    """Declare `topology` idempotently; a clash raises :class:`TopologyError`."""
    entity = ""
    try:
        entity = f"exchange {topology.dead_letter_exchange!r}"
        dlx = await channel.declare_exchange(
            topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for spec in topology.queues():
            entity = f"queue {spec.name!r}"
            queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            if spec is topology.dead_letter_queue:
                await queue.bind(dlx, routing_key="")
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        detail = describe_amqp_error(exc)
        hint = "delete it or change the config to match"
        quorum = topology.main.arguments.get("x-queue-type") == "quorum"
        if "x-max-priority" in detail and not quorum:
            hint = (
                "a queue's x-max-priority cannot change in place: set max_priority to the "
                "queue's value, or delete the queue (and its messages) to declare it again"
            )
        elif "x-max-priority" in detail or any(arg in detail for arg in _QUORUM_ONLY_ARGUMENTS):
            hint = (
                "a queue's type cannot change in place (classic vs quorum): migrate it as "
                "docs/scaling.md describes"
            )
        raise TopologyError(
            f"{entity} already exists with other arguments: {detail}; {hint}"
        ) from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise TopologyError(f"{entity}: access refused: {describe_amqp_error(exc)}") from None


async def delete_topology(channel: AbstractChannel, topology: WorkerTopology) -> None:
    """Delete every queue of `topology` and its dead-letter exchange (messages included)."""
    for spec in topology.queues():
        await channel.queue_delete(spec.name)
    await channel.exchange_delete(topology.dead_letter_exchange)


async def declare_consumer_queue(channel: AbstractChannel, spec: QueueSpec) -> None:
    """Declare the main queue on a consumer's own channel (again after a reconnect)."""
    await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    """Ready messages in queue `name`, from a passive declare (the broker answers each time)."""
    underlay = await channel.get_underlay_channel()
    result = await underlay.queue_declare(name, passive=True)
    return int(result.message_count or 0)


def describe_amqp_error(exc: BaseException | None) -> str:
    """A one-line description of an AMQP error: the broker's reply text when it gave one."""
    if exc is None:
        return ""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiormq.exceptions.ChannelClosed) and exc.args:
        text = str(exc.args[-1]) if len(exc.args) > 1 else str(exc.args[0])
    return one_line(text)
