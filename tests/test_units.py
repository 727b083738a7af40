"""The systemd units: the template differs from the plain unit only where it should."""

from __future__ import annotations

from pathlib import Path

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def settings(name: str) -> list[str]:
    """The unit's directives, comments and blank lines left out."""
    lines = (SYSTEMD / name).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_the_template_is_the_unit_plus_its_port() -> None:
    plain, template = settings("formcraftd.service"), settings("formcraftd@.service")
    only_plain = [line for line in plain if line not in template]
    only_template = [line for line in template if line not in plain]
    assert only_plain == ["Description=formcraftd background-job daemon (RabbitMQ consumer)"]
    assert only_template == [
        "Description=formcraftd background-job daemon (RabbitMQ consumer), HTTP port %i",
        "Environment=FORMCRAFTD_HTTP_PORT=%i",
    ]
