"""Config faults at start: one clear line on stderr, exit 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.process import run_cli

pytestmark = [pytest.mark.faults]


def start_with(path: Path) -> tuple[int, str]:
    result = run_cli("run", "--config", str(path))
    return result.returncode, result.stderr


def assert_one_line(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0, stderr
    for needle in needles:
        assert needle in stderr


def test_missing_file(tmp_path: Path) -> None:
    """A config path that does not exist."""
    code, stderr = start_with(tmp_path / "nope.toml")
    assert code == 1
    assert_one_line(stderr, "nope.toml", "no such config file")


def test_unreadable_file(tmp_path: Path) -> None:
    """A path that cannot be read as a file (a folder; the tests run as root)."""
    folder = tmp_path / "config.toml"
    folder.mkdir()
    code, stderr = start_with(folder)
    assert code == 1
    assert_one_line(stderr, "cannot read config file")


def test_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'[broker]\nurl = "\xff\xfe"\n')
    code, stderr = start_with(path)
    assert code == 1
    assert_one_line(stderr, str(path))


def test_bad_toml(tmp_path: Path) -> None:
    """A syntax error names the file and says it is invalid TOML."""
    path = tmp_path / "config.toml"
    path.write_text("[broker\nurl = 1\n")
    code, stderr = start_with(path)
    assert code == 1
    assert_one_line(stderr, str(path), "invalid TOML")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[workers.webhook]\nconcurrency = "five"\n', "workers.webhook.concurrency"),
        ('[retry]\nbackoff = "fibonacci"\n', "retry.backoff"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[breaker]\nfailure_threshold = -1\n", "breaker.failure_threshold"),
        (
            '[workers.webhook]\nallowed_networks = ["10.0.0.0/33"]\n',
            "workers.webhook.allowed_networks",
        ),
    ],
)
def test_wrong_types_and_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """A wrong type or out-of-range value names the file and the dotted key."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    code, stderr = start_with(path)
    assert code == 1
    assert_one_line(stderr, str(path), key)
