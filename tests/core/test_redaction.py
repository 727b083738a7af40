"""Redaction: secrets masked in free text, URLs and decoded JSON."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formcraftd.core import redaction
from formcraftd.core.redaction import mask_json, mask_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://:p@h/ and https://u:p2@x/", "amqps://:***@h/ and https://u:***@x/"),
        ("https://h.example/hook?token=abc&v=2#top", "https://h.example/hook?token=***&v=***#top"),
        ("https://ghp_token123@h.example/x", "https://***@h.example/x"),
        ('{"url": "https://h/x?sig=abc"}', '{"url": "https://h/x?sig=***"}'),
        ("key whsec_abc+/=", "key whsec_***"),
        ("key whsk_6Xb/dCc+Kvg==, next", "key whsk_***, next"),
        ("authorization: bearer abc.def", "authorization: bearer ***"),
        ("{'Authorization': 'Token abc'}", "{'Authorization': '***'}"),
        ("access_token=a&refresh_token=b", "access_token=***&refresh_token=***"),
        ('{"password": "with space"}', '{"password": "***"}'),
        ('{\\"client_secret\\": \\"x\\"}', '{\\"client_secret\\": \\"***\\"}'),
        ("smtp_password: hunter2", "smtp_password: ***"),
    ],
)
def test_redact_masks_secrets(text: str, expected: str) -> None:
    """redact() masks each kind of secret and keeps the text around it."""
    assert redaction.redact(text) == expected


SECRET_WORDS = [
    "://",
    "whsec_",
    "whsk_",
    "Bearer",
    "BASIC",
    "passw",
    "Secret",
    "tOkEn",
    "api-key",
    "apikey",
]


@given(
    st.lists(
        st.sampled_from(SECRET_WORDS)
        | st.text(alphabet="aBkKsS:/_-i\u017f\u0131\u212a \n\u00e9", max_size=8)
        | st.text(max_size=8),
        max_size=6,
    ).map("".join)
)
def test_the_secret_precheck_agrees_with_a_case_insensitive_search(text: str) -> None:
    """The fast pre-check of redact() finds a secret word exactly when IGNORECASE does.

    Long s, dotless i and the Kelvin sign match "s", "i" and "k" case-insensitively.
    """
    expected = redaction._MAYBE_SECRET.search(text) is not None
    assert redaction.might_contain_secret(text) == expected


def redact_with_every_pattern(text: str) -> str:
    """redact() as it was before each pattern got its own pre-check: all four, in order."""
    if not redaction.might_contain_secret(text):
        return text
    text = redaction._URL.sub(redaction._mask_url_match, text)
    text = redaction._WEBHOOK_KEY.sub(r"\g<prefix>***", text)
    text = redaction._AUTH_SCHEME.sub(r"\g<scheme> ***", text)
    return redaction._SECRET_PAIR.sub(redaction._mask_value, text)


SECRET_PIECES = [
    *SECRET_WORDS,
    "https://u:pw@h/",
    "whsec_abc",
    "whsk_abc",
    "Bearer x.y",
    "basic dXNlcjpwdw==",
    "password=hunter2",
    "access_token: 'z'",
    'API_KEY="k"',
    "Authorization: Bearer t",
    "client_secret=s",
]


@given(
    st.lists(
        st.sampled_from(SECRET_PIECES) | st.text(alphabet="aBkK:/=_-\"' @\u017f", max_size=8),
        max_size=6,
    ).map("".join)
)
def test_redact_runs_only_the_patterns_it_needs_to_the_same_effect(text: str) -> None:
    """Skipping a pattern whose words are absent changes nothing in what redact() returns."""
    assert redaction.redact(text) == redact_with_every_pattern(text)


@pytest.mark.parametrize(
    "text", ["pa\u017f\u017fword=x", "BAS\u0131C", "to\u212aen", "AUTHORIZATION", "x://y"]
)
def test_the_secret_precheck_finds_words_in_any_case(text: str) -> None:
    """Upper case and the non-ASCII case matches of IGNORECASE all count as secret words."""
    assert redaction.might_contain_secret(text)


@pytest.mark.parametrize(
    "text",
    [
        "token_url=https://oauth2.googleapis.com/token",
        "https://example.com/path@v2",
        "mailto:ada@example.com",
        "delivered to ada@example.com in 12 ms",
        "queue webhook_tasks.retry.1000 declared",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    """Text without secrets is unchanged."""
    assert redaction.redact(text) == text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqp://a:1@h1/,amqp://b:2@h2/", "amqp://a:***@h1/,amqp://b:***@h2/"),
        ("amqp://localhost/", "amqp://localhost/"),
        ("amqps://u:p@h/vhost?auth_mechanism=x", "amqps://u:***@h/vhost?auth_mechanism=***"),
    ],
)
def test_mask_url_masks_every_password_of_a_list(url: str, expected: str) -> None:
    """Each URL of a comma-separated list loses its password, nothing else."""
    assert mask_url(url) == expected


def test_mask_json_masks_values_under_secret_keys_at_any_depth() -> None:
    """Secret-named keys are masked wherever they are; other strings are redacted."""
    document = {
        "payload": {"secret": "whsec_x", "headers": {"X-Api-Key": "k"}, "note": "Bearer abc"},
        "list": [{"refresh_token": "r"}, "plain"],
    }
    assert mask_json(document) == {
        "payload": {"secret": "***", "headers": {"X-Api-Key": "***"}, "note": "Bearer ***"},
        "list": [{"refresh_token": "***"}, "plain"],
    }


def test_mask_json_masks_a_list_of_secrets_whole() -> None:
    """A rotation's list of webhook secrets is masked as one value, not item by item."""
    document = {"payload": {"secret": ["whsec_bmV3", "whsk_b2xk", "plain-old-secret"]}}
    assert mask_json(document) == {"payload": {"secret": "***"}}


def test_mask_url_can_hide_a_path_that_is_the_secret() -> None:
    """An alert sink's URL path (a Slack-style hook token) is hidden; the origin stays."""
    url = "https://hooks.example/services/T0/B0/abcdef?x=1"
    assert mask_url(url, hide_path=True) == "https://hooks.example/***"
    assert mask_url("https://u:p@hooks.example/", hide_path=True) == "https://u:***@hooks.example/"
