"""The reloader: what a reload applies and what it says needs a restart."""

from __future__ import annotations

from pathlib import Path

from formcraftd.core import config as config_module
from formcraftd.core.config import Config
from formcraftd.ops.reload import Reloader, keeping_running, needs_restart

BASE = """
[http]
port = {port}

[workers.webhook]
concurrency = {concurrency}
"""


class Target:
    """A daemon stand-in that takes every config it is given."""

    def __init__(self, path: Path) -> None:
        self.config_path = str(path)
        self.config: Config = config_module.load(path)
        self.applied: list[Config] = []

    async def apply_config(self, new: Config) -> None:
        self.applied.append(new)
        self.config = new


def write(path: Path, *, port: int, concurrency: int) -> None:
    path.write_text(BASE.format(port=port, concurrency=concurrency))


def test_keeping_running_keeps_restart_only_values_and_takes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write(path, port=8080, concurrency=4)
    running = config_module.load(path)
    write(path, port=9090, concurrency=7)
    applied = keeping_running(config_module.load(path), running)
    assert applied.http.port == 8080
    assert applied.workers.webhook.concurrency == 7


def test_events_per_message_needs_a_restart_like_the_rest_of_events(tmp_path: Path) -> None:
    """The events publisher reads [events] once, at start: a new value waits for a restart."""
    path = tmp_path / "config.toml"
    path.write_text("[events]\nevents_per_message = 1\n")
    running = config_module.load(path)
    path.write_text("[events]\nevents_per_message = 50\n")
    new = config_module.load(path)
    assert needs_restart(["events.events_per_message"]) == ["events.events_per_message"]
    assert keeping_running(new, running).events.events_per_message == 1


async def test_a_restart_only_key_changed_and_changed_back_needs_no_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    write(path, port=8080, concurrency=4)
    target = Target(path)
    reloader = Reloader(target)

    write(path, port=9090, concurrency=4)
    first = await reloader.reload()
    assert first["result"] == "success"
    assert first["restart_needed"] == ["http.port"]
    assert target.config.http.port == 8080  # what runs

    write(path, port=9090, concurrency=5)  # still differs from what runs
    second = await reloader.reload()
    assert second["restart_needed"] == ["http.port"]
    assert target.config.workers.webhook.concurrency == 5

    write(path, port=8080, concurrency=5)
    third = await reloader.reload()
    assert third["result"] == "success"
    assert third["restart_needed"] == []
    assert target.config.http.port == 8080
