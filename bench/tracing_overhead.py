"""The CPU cost per job of the tracing hooks, with tracing off and on.

Each mode runs in a fresh process and makes, N times, the calls one webhook job
makes of the hooks (the consumer's attempt, the request's client span with the
traceparent written into its headers, the outcome), timing the process's CPU
(every thread: the batch processor's export thread too), after a warm-up:

- none: the same loop without the hook calls (the code before tracing existed),
  so that `off - none` is what the hooks cost with tracing off;
- off: the no-op hooks of formcraftd.core.tracing, as the daemon runs with
  `[tracing] enabled = false` (the process checks that no OpenTelemetry module
  is loaded: the same with the extra installed or not);
- on, no-op export: OpenTelemetry at 100 % sampling, batch processor, an
  exporter that drops the batches (the SDK's own cost);
- on, OTLP: the same, exported over OTLP/HTTP (protobuf) to a collector on
  loopback, in another process (receiver.py), as the OTEL_* variables say.

    python bench/tracing_overhead.py [--jobs 20000] [--rounds 5] [--json FILE]

The figure is the median of the rounds; CPU time, not wall time, so that a
machine busy with other work skews it less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from formcraftd.core.handler import JobContext  # noqa: E402
from formcraftd.core.tracing import NO_TRACE, NO_TRACER  # noqa: E402 - no OpenTelemetry

MODES = ("none", "off", "on-noop", "on-otlp")
APP_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def one_job(tracer: Any, ctx: Any, i: int) -> None:
    """The hook calls of one webhook job, in the order the consumer and the handler make them."""
    headers = {"traceparent": APP_TRACEPARENT}
    with tracer.attempt(
        kind="webhook",
        queue="webhook_tasks",
        job_id=f"job-{i}",
        attempt=1,
        message_id=f"job-{i}",
        delivery_tag=i,
        body_size=180,
        headers=headers,
    ) as trace:
        if trace is not NO_TRACE:
            ctx = dataclasses.replace(ctx, trace=trace)
        outgoing = {"Content-Type": "application/json"}
        with ctx.trace.client(
            "POST",
            lambda: {
                "http.request.method": "POST",
                "server.address": "hooks.example",
                "server.port": 443,
                "url.full": "https://hooks.example/***",
            },
            carrier=outgoing,
        ) as span:
            span.set_attribute("http.response.status_code", 200)
        ctx.trace.settled("success", None)


def no_hooks(tracer: Any, ctx: Any, i: int) -> None:
    """What one_job allocates and formats, without calling a hook."""
    headers = {"traceparent": APP_TRACEPARENT}
    job_id, outgoing = f"job-{i}", {"Content-Type": "application/json"}
    del headers, job_id, outgoing


def child(mode: str, jobs: int) -> dict[str, Any]:
    """Run in the child process: the CPU microseconds per job of `mode`."""
    shutdown = None
    job = no_hooks if mode == "none" else one_job
    if mode in ("none", "off"):
        tracer: Any = NO_TRACER
    else:
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        from formcraftd.ops import tracing  # noqa: PLC0415

        class Dropped(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        processor = BatchSpanProcessor(Dropped()) if mode == "on-noop" else None
        tracer = tracing.start(processor)
        shutdown = tracer.shutdown
    ctx = JobContext(job_id="job", attempt=1, queue="webhook_tasks")
    for i in range(min(jobs, 2000)):  # warm-up
        job(tracer, ctx, i)
    started = time.process_time()
    for i in range(jobs):
        job(tracer, ctx, i)
    if shutdown is not None:
        shutdown()  # the export of what is still queued counts too
    cpu = time.process_time() - started
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    return {"mode": mode, "cpu_us_per_job": cpu * 1e6 / jobs, "otel_modules": len(loaded)}


def run_mode(mode: str, jobs: int, collector_port: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_SERVICE_NAME": "formcraftd-bench",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--jobs", str(jobs)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.jobs)))
        return
    from webhook_throughput import free_port  # noqa: PLC0415

    port = free_port()
    collector = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(port)])
    try:
        time.sleep(1.0)  # the collector binds its port
        figures: dict[str, list[float]] = {mode: [] for mode in MODES}
        loaded: dict[str, int] = {}
        for number in range(args.rounds):
            shift = number % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                result = run_mode(mode, args.jobs, port)
                figures[mode].append(result["cpu_us_per_job"])
                loaded[mode] = result["otel_modules"]
    finally:
        collector.terminate()
        collector.wait(timeout=10)
    medians = {mode: statistics.median(values) for mode, values in figures.items()}
    print(f"tracing hooks: CPU per job, {args.jobs} jobs, median of {args.rounds} rounds")
    print(f"{'mode':10} {'us/job':>8}  OpenTelemetry modules loaded  rounds (us/job)")
    for mode in MODES:
        rounds = " ".join(f"{value:.1f}" for value in figures[mode])
        print(f"{mode:10} {medians[mode]:8.2f}  {loaded[mode]:28d}  {rounds}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"jobs": args.jobs, "figures": figures, "medians": medians}, indent=2)
        )


if __name__ == "__main__":
    main()
