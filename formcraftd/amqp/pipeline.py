"""One delivery's way through the daemon: decode -> rate -> limit -> breaker -> handler -> outcome.

:class:`JobPipeline` is what the consumer runs for each message it is given. It
owns retries, dead letters and the per-job counts once, for every worker; a
handler only returns or raises a job-fate exception. Nothing is acked before
its outcome (the retry or the dead letter) has been confirmed by the broker;
if that publish fails, the message is returned to the queue instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import msgspec

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
from formcraftd.core import jobs
from formcraftd.core.attempts import Attempt, AttemptReporter, JobOutcome
from formcraftd.core.breakers import BreakerRegistry
from formcraftd.core.config import AnyWorkerConfig, BreakerConfig, DaemonConfig, WorkerKind
from formcraftd.core.errors import (
    BreakerOpen,
    BrokerError,
    Delayed,
    PermanentFailure,
    RetryLater,
    Throttled,
)
from formcraftd.core.handler import Delivered, Handler, JobContext
from formcraftd.core.jobs import Job, JobInvalid
from formcraftd.core.limits import ResizableLimiter
from formcraftd.core.retry import RetrySchedule
from formcraftd.core.stats import QueueStats
from formcraftd.core.text import one_line
from formcraftd.core.tracing import NO_TRACE, NO_TRACER, Tracer

log = logging.getLogger("formcraftd.consumer")

_JOB_CLASSES = (jobs.WebhookJob, jobs.EmailJob, jobs.SheetsJob)


class JobPipeline:
    """Takes the deliveries of one queue, within its concurrency limit, to their outcomes.

    The consumer sets `republisher` to the one on its current channel (a
    reconnect brings a new channel) and puts each delivery's task in `waiting`
    (by delivery) until it gets a concurrency slot (a job waiting for its
    destination's rate limit is still waiting); `in_flight` counts jobs in a handler.
    """

    def __init__(
        self,
        *,
        kind: WorkerKind,
        worker: AnyWorkerConfig,
        handler: Handler[Any],
        acks: Acks,
        breakers: BreakerRegistry,
        breaker_config: BreakerConfig,
        daemon_config: DaemonConfig,
        stats: QueueStats,
        reporter: AttemptReporter,
        count_redeliveries: bool,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.kind = kind
        self.queue = worker.queue
        self.handler = handler
        self.limiter = ResizableLimiter(worker.concurrency)
        self.stats = stats
        self.republisher: Republisher | None = None
        self.waiting: dict[Delivery, asyncio.Task[None]] = {}
        self._running: dict[Delivery, float] = {}  # delivery -> when its try started
        self._acks = acks
        self._schedule = RetrySchedule.from_config(worker.retry)
        self._breakers = breakers
        self._breaker_config = breaker_config
        self._daemon_config = daemon_config
        self._reporter = reporter
        self._tracer = tracer
        self._count_redeliveries = count_redeliveries
        self._settled = SettledDeliveries(
            window_s=daemon_config.settled_memory_s, size=daemon_config.settled_memory_size
        )

    @property
    def in_flight(self) -> int:
        """Jobs a handler is working on now."""
        return len(self._running)

    def oldest_in_flight_s(self) -> float:
        """Age in seconds of the oldest job a handler is working on (0 when idle)."""
        if not self._running:
            return 0.0
        return time.monotonic() - min(self._running.values())

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

    @property
    def _republisher(self) -> Republisher:
        if self.republisher is None:
            raise BrokerError("no channel to publish the outcome on")
        return self.republisher

    async def process(self, message: Delivery) -> None:
        """Take one delivery to its outcome and settle it (ack, or nack to return it)."""
        try:
            await self._process_message(message)
        except asyncio.CancelledError:
            self.waiting.pop(message, None)
            self._running.pop(message, None)
            await asyncio.shield(self._acks.nack(message))
            raise
        except Exception:
            log.exception("unexpected error handling a message from %s", self.queue)
            await self._acks.nack(message)

    async def _process_message(self, message: Delivery) -> None:
        job_id = jobs.job_id_for(message.message_id, message.body)
        tries_before = count_header(message.headers, ATTEMPT_HEADER)
        ctx = JobContext(job_id=job_id, attempt=tries_before + 1, queue=self.queue)
        if message.redelivered and await self._handle_redelivery(message, ctx):
            self.waiting.pop(message, None)
            return
        with self._tracer.attempt(
            kind=self.kind,
            queue=self.queue,
            job_id=job_id,
            attempt=ctx.attempt,
            message_id=message.message_id,
            delivery_tag=message.tag,
            body_size=len(message.body),
            headers=message.headers,
        ) as trace:
            if trace is not NO_TRACE:
                ctx = dataclasses.replace(ctx, trace=trace)
            await self._run_attempt(message, ctx)

    async def _run_attempt(self, message: Delivery, ctx: JobContext) -> None:
        job = self._decode(message)
        if isinstance(job, PermanentFailure):
            self.waiting.pop(message, None)
            await self._settle_outcome(message, None, ctx, job, 0.0)
            return
        limits = self.handler.rate_limits
        if limits is not None and limits.engaged:
            # The destination's turn comes before a concurrency slot: waiting never holds one.
            key = self.handler.breaker_key(job)
            try:
                turn = limits.admit(key)
            except Throttled as throttled:
                self.waiting.pop(message, None)
                await self._settle_outcome(message, job, ctx, throttled, 0.0)
                return
            try:
                if turn is not None:
                    await turn
                result, duration = await self._run_in_slot(message, job, ctx)
            finally:
                limits.done(key)
        else:
            result, duration = await self._run_in_slot(message, job, ctx)
        await self._settle_outcome(message, job, ctx, result, duration)

    async def _run_in_slot(
        self, message: Delivery, job: Job, ctx: JobContext
    ) -> tuple[Exception | Delivered | None, float]:
        """One try within the queue's concurrency limit (a batching handler holds it itself)."""
        if self.handler.batching:
            slotted = dataclasses.replace(ctx, slot=self.limiter)
            return await self._run_handler(message, job, slotted)
        async with self.limiter:
            return await self._run_handler(message, job, ctx)

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
                extra={"queue": self.queue, "job_id": ctx.job_id},
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
                await self._republisher.dead_letter(message, ctx.job_id, failure, ctx.attempt - 1)
                self.stats.dead_letter += 1
                attempt = Attempt(self.kind, self.queue, ctx, None, "dead_letter", failure)
                self._reporter.dead_lettered(attempt, failure, ctx.attempt - 1)
                self._report(attempt)
            else:
                headers = carried_headers(message.headers)
                headers[REDELIVERIES_HEADER] = redeliveries
                await self._republisher.to_queue_tail(message, ctx.job_id, headers)
        except Exception as exc:
            log.error(
                "%s: could not count the redelivery of job %s (%s)",
                self.queue,
                ctx.job_id,
                one_line(exc),
            )
            await self._acks.nack(message)
            return True
        self._acks.ack(message)
        return True

    async def _run_handler(
        self, message: Delivery, job: Job, ctx: JobContext
    ) -> tuple[Exception | Delivered | None, float]:
        """One try, counted as in flight; its result and its duration."""
        self.waiting.pop(message, None)
        started = self._running[message] = time.monotonic()
        try:
            result = await self._attempt(job, ctx)
        finally:
            self._running.pop(message, None)
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
                raise JobInvalid(f"a {jobs.kind_of(job)} job does not belong on {self.queue}")
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
            breaker.record_failure(exc.code, exc.status)
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
            self._reporter.unexpected(exc, queue=self.queue, job_id=ctx.job_id)
            log.exception("handler for %s raised unexpectedly (job %s)", self.queue, ctx.job_id)
            return RetryLater("INTERNAL_ERROR", f"internal error: {type(exc).__name__}")
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
                    self.queue,
                    ctx.job_id,
                    one_line(exc),
                )
                await self._acks.nack(message)
                return
        ctx.trace.settled(outcome, final)
        if outcome != "delayed":
            self._settled.add(ctx.job_id, ctx.attempt - 1)
        self._acks.ack(message)
        if job is not None and not isinstance(failure, Delayed):
            self.stats.durations.observe(duration)
        delivered = result if isinstance(result, Delivered) else None
        self._report(Attempt(self.kind, self.queue, ctx, job, outcome, final, delivered, duration))

    async def _publish_outcome(
        self,
        message: Delivery,
        job: Job | None,
        ctx: JobContext,
        failure: Exception,
    ) -> tuple[JobOutcome, Exception]:
        """Publish where a failed job goes next; the outcome and the failure that decided it."""
        if isinstance(failure, Delayed):
            return await self._delay(message, ctx, failure)
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
        await self._republisher.dead_letter(
            message, ctx.job_id, failure, ctx.attempt, trace=ctx.trace
        )
        self.stats.dead_letter += 1
        self._reporter.dead_lettered(
            Attempt(self.kind, self.queue, ctx, job, "dead_letter"), failure, ctx.attempt
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
        await self._republisher.to_tier(message, ctx.job_id, body, headers, tier, trace=ctx.trace)

    async def _delay(
        self, message: Delivery, ctx: JobContext, failure: Delayed
    ) -> tuple[JobOutcome, Exception]:
        """Delay the job without using a try (an open breaker, a rate limit), or dead-letter
        it with the delay's `expired_code` once it is older than `max_job_age_ms`."""
        now_ms = time.time() * 1000
        first_seen = first_seen_ms(message, now_ms)
        if now_ms - first_seen > self._breaker_config.max_job_age_ms:
            expired = PermanentFailure(
                failure.expired_code,
                f"{failure} for longer than the job may wait",
                reached_service=False,
            )
            await self._republisher.dead_letter(
                message, ctx.job_id, expired, ctx.attempt - 1, trace=ctx.trace
            )
            self.stats.dead_letter += 1
            self._reporter.dead_lettered(
                Attempt(self.kind, self.queue, ctx, None, "dead_letter"),
                expired,
                ctx.attempt - 1,
            )
            return "dead_letter", expired
        headers = carried_headers(message.headers)
        headers[ATTEMPT_HEADER] = ctx.attempt - 1
        headers[FIRST_SEEN_HEADER] = int(first_seen)
        tier = self._schedule.nearest_tier(failure.remaining * 1000)
        await self._republisher.to_tier(
            message, ctx.job_id, message.body, headers, tier, trace=ctx.trace
        )
        self.stats.delayed += 1
        return "delayed", failure

    def _report(self, attempt: Attempt) -> None:
        code = getattr(attempt.failure, "code", None)
        if code is not None:
            self.stats.count_error(code)
        self._reporter.attempt(attempt)
