"""Dead-letter tools: selective replay with filters, dry runs, and the time parser."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from formcraftd.amqp import dead_letters
from formcraftd.amqp.dead_letters import ReplayFilter, parse_when
from formcraftd.amqp.topology import WorkerTopology, declare_topology
from formcraftd.core.config import Config
from tests.support import Broker, Names, make_config
from tests.support.process import free_port, run_cli, write_config

pytestmark = [pytest.mark.e2e]

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def test_parse_when_takes_rfc_3339_and_ages() -> None:
    assert parse_when("2026-12-01T10:00:00Z") == dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
    assert parse_when("2026-12-01") == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert parse_when("2h", now=NOW) == NOW - dt.timedelta(hours=2)
    assert parse_when("30m", now=NOW) == NOW - dt.timedelta(minutes=30)
    assert parse_when("7d", now=NOW) == NOW - dt.timedelta(days=7)
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday")


LETTERS: list[dict[str, Any]] = [
    # id, error code, failed at, form, url
    {
        "id": "a",
        "code": "HTTP_STATUS",
        "at": "2026-12-05T08:00:00.000+00:00",
        "form": "f1",
        "url": "https://one.example/hook",
    },
    {
        "id": "b",
        "code": "RETRIES_EXHAUSTED",
        "at": "2026-12-05T10:00:00.000+00:00",
        "form": "f1",
        "url": "https://two.example/hook",
    },
    {
        "id": "c",
        "code": "HTTP_STATUS",
        "at": "2026-12-05T11:00:00.000+00:00",
        "form": "f2",
        "url": "https://ONE.example/other?token=t",
    },
    {
        "id": "d",
        "code": "VALIDATION_ERROR",
        "at": "2026-12-05T11:30:00.000+00:00",
        "form": None,
        "url": None,
    },
]


async def seed(amqp: Broker, cfg: Config) -> str:
    """The four dead letters above in the webhook queue's DLQ; the main queue's name."""
    amqp.track(cfg)
    channel = await amqp.connection.channel(publisher_confirms=True)
    await declare_topology(channel, WorkerTopology.build(cfg.workers.webhook, cfg.broker))
    queue = cfg.workers.webhook.queue
    for letter in LETTERS:
        if letter["url"] is None:
            body = b"not json"
        else:
            body = orjson.dumps(
                {
                    "type": "webhook.send",
                    "payload": {"url": letter["url"], "body": {}},
                    "metadata": {"formId": letter["form"], "submissionId": letter["id"]},
                }
            )
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=letter["id"],
                headers={
                    "x-formcraft-error-code": letter["code"],
                    "x-formcraft-failed-at": letter["at"],
                    "x-formcraft-attempts": 3,
                    "x-formcraft-queue": queue,
                },
            ),
            routing_key=f"dlq.{queue}",
        )
    await channel.close()
    return queue


async def ids_in(amqp: Broker, queue: str) -> list[str]:
    messages = await amqp.take(queue, await amqp.depth(queue))
    return [str(message.message_id) for message in messages]


@pytest.mark.parametrize(
    ("only", "expected"),
    [
        (ReplayFilter(error_code="HTTP_STATUS"), ["a", "c"]),
        (ReplayFilter(host="one.example"), ["a", "c"]),
        (ReplayFilter(form_id="f1"), ["a", "b"]),
        (ReplayFilter(since=parse_when("2026-12-05T09:00:00Z")), ["b", "c", "d"]),
        (ReplayFilter(until=parse_when("2026-12-05T10:00:00Z")), ["a"]),
        (ReplayFilter(error_code="HTTP_STATUS", form_id="f2"), ["c"]),
        (ReplayFilter(), ["a", "b", "c", "d"]),
    ],
)
async def test_replay_moves_what_the_filters_select_and_keeps_the_rest_in_order(
    names: Names, amqp: Broker, only: ReplayFilter, expected: list[str]
) -> None:
    queue = await seed(amqp, make_config(names))
    channel = await amqp.connection.channel(publisher_confirms=True)
    result = await dead_letters.replay(channel, queue, only=only)
    await channel.close()
    assert (result.replayed, result.dry_run) == (len(expected), False)
    assert sorted(await ids_in(amqp, queue)) == expected
    left = [letter["id"] for letter in LETTERS if letter["id"] not in expected]
    assert await ids_in(amqp, f"dlq.{queue}") == left


async def test_a_dry_run_moves_nothing_and_describes_what_would_move(
    names: Names, amqp: Broker
) -> None:
    queue = await seed(amqp, make_config(names))
    channel = await amqp.connection.channel(publisher_confirms=True)
    result = await dead_letters.replay(
        channel, queue, only=ReplayFilter(host="one.example"), dry_run=True
    )
    await channel.close()
    assert (result.replayed, result.scanned, result.dry_run) == (0, 4, True)
    assert [letter["job_id"] for letter in result.would_replay] == ["a", "c"]
    assert "token=t" not in json.dumps(result.as_json(queue))  # described with secrets masked
    assert await amqp.depth(queue) == 0
    assert await ids_in(amqp, f"dlq.{queue}") == ["a", "b", "c", "d"]


async def test_replay_with_a_limit_stops_after_that_many_matches(
    names: Names, amqp: Broker
) -> None:
    queue = await seed(amqp, make_config(names))
    channel = await amqp.connection.channel(publisher_confirms=True)
    result = await dead_letters.replay(channel, queue, 1, only=ReplayFilter(form_id="f2"))
    await channel.close()
    assert result.replayed == 1
    assert await ids_in(amqp, queue) == ["c"]
    assert await ids_in(amqp, f"dlq.{queue}") == ["a", "b", "d"]


async def test_the_command_line_takes_the_filters_and_a_dry_run(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    queue = await seed(amqp, make_config(names))
    config_file = write_config(tmp_path / "config.toml", names, port=free_port())
    args = ("dlq", "replay", queue, "--config", str(config_file))
    dry = await asyncio.to_thread(
        run_cli,
        *args,
        "--error-code",
        "HTTP_STATUS",
        "--since",
        "2026-12-05T09:00:00Z",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert (shown["dry_run"], shown["replayed"]) == (True, 0)
    assert [letter["job_id"] for letter in shown["would_replay"]] == ["c"]
    moved = await asyncio.to_thread(run_cli, *args, "--form-id", "f1")
    assert json.loads(moved.stdout)["replayed"] == 2
    assert sorted(await ids_in(amqp, queue)) == ["a", "b"]
    typo = await asyncio.to_thread(run_cli, *args, "--error-code", "HTTP_STAUS")
    assert typo.returncode == 2
    assert "did you mean HTTP_STATUS?" in typo.stderr
    bad_time = await asyncio.to_thread(run_cli, *args, "--since", "last week")
    assert bad_time.returncode == 2 and "not a time" in bad_time.stderr
    on_list = await asyncio.to_thread(
        run_cli, "dlq", "list", queue, "--host", "x", "--config", str(config_file)
    )
    assert on_list.returncode == 2
