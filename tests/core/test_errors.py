"""Error codes: every code an attempt can carry is documented, in the schema and the README."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from formcraftd.core import events
from formcraftd.core.errors import ERROR_CODES, ErrorCode, RetryCode

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_code_has_a_description() -> None:
    assert set(ERROR_CODES) == set(get_args(ErrorCode)) | set(get_args(RetryCode))
    assert all(text and "\n" not in text for text in ERROR_CODES.values())


def test_the_events_schema_lists_every_code() -> None:
    schema = events.schema()
    delivery = schema["$defs"]["DeliveryEvent"]["properties"]  # type: ignore[index]
    choices = delivery["error_code"]["anyOf"]
    listed = {code for choice in choices for code in choice.get("enum", [])}
    assert listed == set(ERROR_CODES)


def test_the_readme_lists_every_code() -> None:
    text = README.read_text()
    missing = [code for code in ERROR_CODES if f"| `{code}` |" not in text]
    assert not missing, f"README.md has no row for {missing}"
