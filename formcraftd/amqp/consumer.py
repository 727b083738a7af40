"""The one generic consumer: decode -> limit -> breaker -> handler -> outcome.

It owns acks, retries, dead letters and job metrics once, for every worker. A
handler only returns or raises a job-fate exception. Nothing is acked
before its outcome (the retry or the dead letter) has been confirmed by the
broker; if that publish fails, the message is returned to the queue instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Any, Literal

import msgspec
from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from formcraftd.amqp.acks import Acks, Delivery
from formcraftd.amqp.republisher import (
    ATTEMPT_HEADER,
    FIRST_SEEN_HEADER,
    REDELIVERIES_HEADER,
    Republisher,
    carried_headers,
    count_header,
    first_seen_ms,
)
from formcraftd.amqp.settled import SettledDeliveries
from formcraftd.amqp.topology import WorkerTopology, declare_consumer_queue
from formcraftd.core import jobs
from formcraftd.core.attempts import Attempt, AttemptReporter, JobOutcome
from formcraftd.core.breakers import BreakerRegistry
from formcraftd.core.config import AnyWorkerConfig, BreakerConfig, DaemonConfig, WorkerKind
from formcraftd.core.errors import BreakerOpen, PermanentFailure, RetryLater
from formcraftd.core.handler import Delivered, Handler, JobContext
from formcraftd.core.jobs import Job, JobInvalid
from formcraftd.core.limits import ResizableLimiter
from formcraftd.core.retry import RetrySchedule
from formcraftd.core.stats import QueueStats
from formcraftd.core.text import one_line

log = logging.getLogger("formcraftd.consumer")

_JOB_CLASSES = (jobs.WebhookJob, jobs.EmailJob, jobs.SheetsJob)

ConsumerState = Literal["starting", "consuming", "paused", "stopping", "stopped"]

RESUBSCRIBE_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the broker cancelled our consumer


class Consumer:
    """Consumes one queue on its own channel, within its own concurrency limit."""

    def __init__(
        self,
        *,
        kind: WorkerKind,
        worker: AnyWorkerConfig,
        topology: WorkerTopology,
        handler: Handler[Any],
        channel: AbstractRobustChannel,
        breakers: BreakerRegistry,
        breaker_config: BreakerConfig,
        daemon_config: DaemonConfig,
        stats: QueueStats,
        reporter: AttemptReporter,
        prefetch: int,
    ) -> None:
        self.queue_name = worker.queue
        self.kind = kind
        self.prefetch = prefetch  # what the channel's QoS is set to
        self.handler = handler
        self._topology = topology
        self._schedule = RetrySchedule.from_config(worker.retry)
        self._channel = channel
        self._breakers = breakers
        self._breaker_config = breaker_config
        self._daemon_config = daemon_config
        self.stats = stats
        self._reporter = reporter
        self.limiter = ResizableLimiter(worker.concurrency)
        self.state: ConsumerState = "starting"
        self._acks = Acks(batch=_ack_batch(prefetch), on_lost=self._acks_lost)
        self._queue: AbstractRobustQueue | None = None  # held: the channel re-declares it
        self._underlay: AbstractChannel | None = None  # the AMQP channel we consume on
        self._outcomes = Republisher(channel, worker.queue)
        self._settled = SettledDeliveries(
            window_s=daemon_config.settled_memory_s, size=daemon_config.settled_memory_size
        )
        self._count_redeliveries = topology.main.arguments.get("x-queue-type") == "classic"
        self._tag: str | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._deadline = 0.0
        self._tasks: set[asyncio.Task[None]] = set()  # every message not yet settled
        self._waiting: set[asyncio.Task[None]] = set()  # ... of which waiting for a slot
        self._running: dict[asyncio.Task[None], float] = {}  # ... of which in a handler

    # --- lifecycle ------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        return self.state == "consuming" and self._tag is not None and not self._channel.is_closed

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def oldest_in_flight_s(self) -> float:
        """Age in seconds of the oldest job a handler is working on (0 when idle)."""
        if not self._running:
            return 0.0
        return time.monotonic() - min(self._running.values())

    async def run(self) -> None:
        """Consume until :meth:`stop`, then drain in-flight jobs by the deadline."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            # A robust channel declares the queue again after a reconnect, and
            # then calls _on_reopen, which consumes again on the new channel.
            self._queue = await declare_consumer_queue(self._channel, self._topology.main)
            await self._outcomes.declare(self._topology.dead_letter_exchange)
            self._channel.reopen_callbacks.add(self._on_reopen)
            flusher = tg.create_task(self._acks.run())
            await self._subscribe()
            self.subscribed.set()
            await self._stop.wait()
            self.state = "stopping"
            await self._unsubscribe()
            self._requeue_waiting()
            await self._drain()
            await self._acks.flush(everything=True)
            flusher.cancel()
        self._channel.reopen_callbacks.discard(self._on_reopen)
        self._tg = None
        self.state = "stopped"
        if not self._channel.is_closed:
            await self._channel.close()

    def stop(self, deadline: float) -> None:
        """Ask the consumer to stop; in-flight jobs may run until monotonic `deadline`."""
        self._deadline = deadline
        self._stop.set()

    async def set_prefetch(self, prefetch: int) -> None:
        """Change the channel's prefetch; a live consumer is re-subscribed to pick it up.

        Messages already delivered stay with this channel and are settled as
        usual, so nothing is lost or delivered twice.
        """
        if prefetch == self.prefetch:
            return
        self.prefetch = prefetch
        self._acks.set_batch(_ack_batch(prefetch))
        if self.state != "consuming":
            await self._channel.set_qos(prefetch_count=prefetch)
            return
        await self._unsubscribe()
        await self._channel.set_qos(prefetch_count=prefetch)
        await self._subscribe()

    async def pause(self) -> None:
        if self.state == "consuming":
            await self._unsubscribe()
            self.state = "paused"

    async def resume(self) -> None:
        if self.state == "paused":
            await self._subscribe()

    def reconfigure(
        self, worker: AnyWorkerConfig, breaker_config: BreakerConfig, daemon_config: DaemonConfig
    ) -> None:
        """Apply live settings: concurrency, retry schedule, breaker and size limits."""
        self._schedule = RetrySchedule.from_config(worker.retry)
        self._breaker_config = breaker_config
        self._daemon_config = daemon_config
        self._settled.reconfigure(
            window_s=daemon_config.settled_memory_s, size=daemon_config.settled_memory_size
        )
        self.limiter.resize(worker.concurrency)

    async def _subscribe(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        if underlay is not self._underlay:
            underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        ok = await underlay.basic_consume(self.queue_name, self._on_delivery, no_ack=False)
        self._underlay, self._tag = underlay, ok.consumer_tag
        self.state = "consuming"

    async def _unsubscribe(self) -> None:
        underlay, tag = self._underlay, self._tag
        self._tag = None
        if underlay is None or tag is None or underlay.is_closed:
            return
        try:
            await underlay.basic_cancel(tag)
        except Exception as exc:  # the channel may be closing under us
            log.warning("cancelling consumer of %s failed: %s", self.queue_name, exc)

    async def _on_reopen(self, _channel: object) -> None:
        """After a reconnect: consume again on the new channel, unless paused or stopping."""
        self._tag = None
        if self.state != "consuming" or self._stop.is_set():
            return
        try:
            await self._subscribe()
        except Exception as exc:
            log.error("%s: could not consume again after reconnecting: %s", self.queue_name, exc)
            self._start_resubscribing()

    def _on_cancelled(self, frame: Basic.Cancel) -> None:
        """The broker cancelled our consumer (e.g. the queue was deleted): subscribe again."""
        if frame.consumer_tag != self._tag:
            return
        self._tag = None
        log.warning("%s: the broker cancelled our consumer; subscribing again", self.queue_name)
        self._start_resubscribing()

    def _start_resubscribing(self) -> None:
        if self._tg is not None and not self._stop.is_set():
            self._tg.create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Declare the queue again and consume, with growing pauses, until it works or we stop."""
        for attempt in itertools.count():
            delay = RESUBSCRIBE_DELAYS_S[min(attempt, len(RESUBSCRIBE_DELAYS_S) - 1)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set() or self._tag is not None or self.state != "consuming":
                return
            try:
                await declare_consumer_queue(self._channel, self._topology.main)
                await self._subscribe()
            except Exception as exc:
                log.warning("%s: subscribing again failed: %s", self.queue_name, one_line(exc))
                continue
            log.info("%s: consuming again", self.queue_name)
            return

    def _acks_lost(self, count: int) -> None:
        log.warning(
            "%s: %d acks lost with their channel; the broker will redeliver those jobs, "
            "which are recognised as settled and not run again",
            self.queue_name,
            count,
        )

    def _requeue_waiting(self) -> None:
        """Jobs that never got a concurrency slot go back to the queue at once."""
        for task in list(self._waiting):
            task.cancel()

    async def _drain(self) -> None:
        """Wait for unsettled jobs until the deadline (which a forced stop moves to now)."""
        if self._tasks:
            log.info(
                "%s: waiting up to %.1f s for %d in-flight jobs",
                self.queue_name,
                max(0.0, self._deadline - time.monotonic()),
                len(self._tasks),
            )
        while self._tasks and (remaining := self._deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._tasks), timeout=min(remaining, 0.1))
        if self._tasks:
            log.warning(
                "%s: %d jobs still running at the deadline; returning them to the queue",
                self.queue_name,
                len(self._tasks),
            )
            for task in self._tasks:
                task.cancel()

    async def _on_delivery(self, raw: DeliveredMessage) -> None:
        # The channel calls this in a task of its own, which a closing channel
        # cancels; the work goes to a task owned by this consumer's task group,
        # so a job in flight finishes (and is remembered as settled) even then.
        if self._tg is None:
            return  # the consumer has finished: closing its channel returns the message
        message = Delivery(raw)
        self._acks.track(message)
        if self._stop.is_set():
            self._tg.create_task(self._acks.nack(message))
            return
        task = self._tg.create_task(self._process(message))
        self._tasks.add(task)
        self._waiting.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one message ------------------------------------------------------------

    async def _process(self, message: Delivery) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            await self._process_message(message, task)
        except asyncio.CancelledError:
            self._waiting.discard(task)
            self._running.pop(task, None)
            await asyncio.shield(self._acks.nack(message))
            raise
        except Exception:
            log.exception("unexpected error handling a message from %s", self.queue_name)
            await self._acks.nack(message)

    async def _process_message(self, message: Delivery, task: asyncio.Task[None]) -> None:
        job_id = jobs.job_id_for(message.message_id, message.body)
        tries_before = count_header(message.headers, ATTEMPT_HEADER)
        ctx = JobContext(job_id=job_id, attempt=tries_before + 1, queue=self.queue_name)
        if message.redelivered and await self._handle_redelivery(message, ctx):
            self._waiting.discard(task)
            return
        job = self._decode(message)
        if isinstance(job, PermanentFailure):
            self._waiting.discard(task)
            await self._settle_outcome(message, None, ctx, job, 0.0)
            return
        if self.handler.batching:
            ctx = dataclasses.replace(ctx, slot=self.limiter)
            result, duration = await self._run_handler(job, ctx, task)
        else:
            async with self.limiter:
                result, duration = await self._run_handler(job, ctx, task)
        await self._settle_outcome(message, job, ctx, result, duration)

    async def _handle_redelivery(self, message: Delivery, ctx: JobContext) -> bool:
        """Settle a redelivered message without running it, when that is the safe thing.

        A delivery this process already settled (its ack was lost) is acked again.
        On classic queues, which do not count deliveries, each redelivery is
        counted in a header by moving the message to the queue's tail; past
        `max_redeliveries` (a message the process keeps dying on) it is
        dead-lettered. Quorum queues count natively (`x-delivery-limit`).
        """
        if (ctx.job_id, ctx.attempt - 1) in self._settled:
            log.info(
                "job %s was redelivered after it was settled; not running it again",
                ctx.job_id,
                extra={"queue": self.queue_name, "job_id": ctx.job_id},
            )
            self.stats.duplicates += 1
            self._acks.ack(message)
            return True
        if not self._count_redeliveries:
            return False
        redeliveries = count_header(message.headers, REDELIVERIES_HEADER) + 1
        try:
            if redeliveries > self._daemon_config.max_redeliveries:
                failure = PermanentFailure(
                    "RETRIES_EXHAUSTED",
                    f"redelivered {redeliveries} times without being settled",
                    reached_service=False,
                )
                await self._outcomes.dead_letter(message, ctx.job_id, failure, ctx.attempt - 1)
                self.stats.dead_letter += 1
                attempt = Attempt(self.kind, self.queue_name, ctx, None, "dead_letter", failure)
                self._reporter.dead_lettered(attempt, failure, ctx.attempt - 1)
                self._report(attempt)
            else:
                headers = carried_headers(message.headers)
                headers[REDELIVERIES_HEADER] = redeliveries
                await self._outcomes.to_queue_tail(message, ctx.job_id, headers)
        except Exception as exc:
            log.error(
                "%s: could not count the redelivery of job %s (%s)",
                self.queue_name,
                ctx.job_id,
                one_line(exc),
            )
            await self._acks.nack(message)
            return True
        self._acks.ack(message)
        return True

    async def _run_handler(
        self, job: Job, ctx: JobContext, task: asyncio.Task[None]
    ) -> tuple[Exception | Delivered | None, float]:
        """One try, counted as in flight; its result and its duration."""
        self._waiting.discard(task)
        started = self._running[task] = time.monotonic()
        try:
            result = await self._attempt(job, ctx)
        finally:
            self._running.pop(task, None)
        return result, time.monotonic() - started

    def _decode(self, message: Delivery) -> Job | PermanentFailure:
        """The typed job, or the VALIDATION_ERROR that dead-letters the message."""
        limit = self._daemon_config.max_message_bytes
        try:
            if len(message.body) > limit:
                raise JobInvalid(
                    f"message is {len(message.body)} bytes, over the {limit} byte limit"
                )
            job = jobs.decode(message.body)
            if type(job) is not self.handler.job_type:
                raise JobInvalid(f"a {jobs.kind_of(job)} job does not belong on {self.queue_name}")
        except JobInvalid as exc:
            return PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False)
        return job

    async def _attempt(self, job: Job, ctx: JobContext) -> Exception | Delivered | None:
        """Run the handler under the job's breaker; the failure, or what it delivered."""
        breaker = self._breakers.get(self.handler.breaker_key(job))
        probing = breaker.state == "half_open"
        try:
            breaker.acquire()
        except BreakerOpen as exc:
            return exc
        try:
            delivered = await self.handler.handle(job, ctx)
        except PermanentFailure as exc:
            if exc.reached_service:
                breaker.record_success()
            else:
                breaker.release()
            return exc
        except RetryLater as exc:
            if not exc.counts_for_breaker:
                breaker.release()
                return exc
            breaker.record_failure()
            if probing:
                # The service is still down: like the jobs that waited, the probe
                # waits out the breaker again instead of spending one of its tries.
                return BreakerOpen(breaker.key, breaker.reset_timeout_s)
            return exc
        except asyncio.CancelledError:
            breaker.release()
            raise
        except Exception as exc:
            breaker.release()
            self._reporter.unexpected(exc, queue=self.queue_name, job_id=ctx.job_id)
            log.exception(
                "handler for %s raised unexpectedly (job %s)", self.queue_name, ctx.job_id
            )
            return RetryLater(f"internal error: {type(exc).__name__}")
        breaker.record_success()
        return delivered

    # --- outcomes -----------------------------------------------------------------

    async def _settle_outcome(
        self,
        message: Delivery,
        job: Job | None,
        ctx: JobContext,
        result: Exception | Delivered | None,
        duration: float,
    ) -> None:
        failure = result if isinstance(result, Exception) else None
        outcome: JobOutcome = "success"
        final: Exception | None = None
        if failure is None:
            self.stats.success += 1
        else:
            try:
                outcome, final = await self._publish_outcome(message, job, ctx, failure)
            except Exception as exc:
                log.error(
                    "%s: could not publish the outcome of job %s (%s); returning it to the queue",
                    self.queue_name,
                    ctx.job_id,
                    one_line(exc),
                )
                await self._acks.nack(message)
                return
        if outcome != "delayed":
            self._settled.add(ctx.job_id, ctx.attempt - 1)
        self._acks.ack(message)
        if job is not None and not isinstance(failure, BreakerOpen):
            self.stats.durations.observe(duration)
        delivered = result if isinstance(result, Delivered) else None
        self._report(
            Attempt(self.kind, self.queue_name, ctx, job, outcome, final, delivered, duration)
        )

    async def _publish_outcome(
        self,
        message: Delivery,
        job: Job | None,
        ctx: JobContext,
        failure: Exception,
    ) -> tuple[JobOutcome, Exception]:
        """Publish where a failed job goes next; the outcome and the failure that decided it."""
        if isinstance(failure, BreakerOpen):
            return await self._delay_for_breaker(message, ctx, failure)
        if isinstance(failure, RetryLater) and self._schedule.tries_left(ctx.attempt):
            await self._retry(message, job, ctx, failure)
            self.stats.retry += 1
            return "retry", failure
        if isinstance(failure, RetryLater):
            failure = PermanentFailure(
                "RETRIES_EXHAUSTED",
                f"gave up after {ctx.attempt} tries: {failure.reason}",
                status=failure.status,
                snippet=failure.snippet,
            )
        assert isinstance(failure, PermanentFailure)
        await self._outcomes.dead_letter(message, ctx.job_id, failure, ctx.attempt)
        self.stats.dead_letter += 1
        self._reporter.dead_lettered(
            Attempt(self.kind, self.queue_name, ctx, job, "dead_letter"), failure, ctx.attempt
        )
        return "dead_letter", failure

    async def _retry(
        self,
        message: Delivery,
        job: Job | None,
        ctx: JobContext,
        failure: RetryLater,
    ) -> None:
        delay = self._schedule.delay_ms(ctx.attempt)
        if failure.after is not None:
            delay = max(delay, round(failure.after * 1000))
        tier = self._schedule.tier_at_least(delay)
        retried = failure.replacement if isinstance(failure.replacement, _JOB_CLASSES) else job
        if isinstance(retried, jobs.WebhookJob):
            metadata = msgspec.structs.replace(retried.metadata, retry_count=ctx.attempt)
            retried = msgspec.structs.replace(retried, metadata=metadata)
        body = message.body if retried is job or retried is None else jobs.encode(retried)
        headers = carried_headers(message.headers)
        headers[ATTEMPT_HEADER] = ctx.attempt
        await self._outcomes.to_tier(message, ctx.job_id, body, headers, tier)

    async def _delay_for_breaker(
        self, message: Delivery, ctx: JobContext, failure: BreakerOpen
    ) -> tuple[JobOutcome, Exception]:
        now_ms = time.time() * 1000
        first_seen = first_seen_ms(message, now_ms)
        if now_ms - first_seen > self._breaker_config.max_job_age_ms:
            expired = PermanentFailure(
                "BREAKER_OPEN", f"{failure} for longer than the job may wait", reached_service=False
            )
            await self._outcomes.dead_letter(message, ctx.job_id, expired, ctx.attempt - 1)
            self.stats.dead_letter += 1
            self._reporter.dead_lettered(
                Attempt(self.kind, self.queue_name, ctx, None, "dead_letter"),
                expired,
                ctx.attempt - 1,
            )
            return "dead_letter", expired
        headers = carried_headers(message.headers)
        headers[ATTEMPT_HEADER] = ctx.attempt - 1
        headers[FIRST_SEEN_HEADER] = int(first_seen)
        tier = self._schedule.nearest_tier(failure.remaining * 1000)
        await self._outcomes.to_tier(message, ctx.job_id, message.body, headers, tier)
        self.stats.delayed += 1
        return "delayed", failure

    def _report(self, attempt: Attempt) -> None:
        self._reporter.attempt(attempt)


def _ack_batch(prefetch: int) -> int:
    """Due acks that are flushed without waiting: a quarter of the prefetch window."""
    return max(1, prefetch // 4)
