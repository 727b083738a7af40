"""Masking secrets in text, URLs and decoded JSON before anything is shown.

:func:`redact` masks obvious secrets in free text (URL passwords, ``whsec_``
and ``whsk_`` keys, bearer and basic credentials, ``password=...``-style pairs);
every log line, error reason, dead-letter header and event snippet passes
through it as a last line of defence. :func:`mask_url` masks the password of a URL (or of
each URL of a comma-separated list) and :func:`mask_json` every value of a
decoded JSON document whose key names a secret. Call sites must still never
show a secret on purpose.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# A URL in free text: up to whitespace, a quote, an angle bracket or a backslash
# (JSON quotes inside JSON).
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s"'<>`\\]+""")
# Standard Webhooks secrets: HMAC (whsec_) and Ed25519 private (whsk_) keys.
_WEBHOOK_KEY = re.compile(r"(?P<prefix>whsec_|whsk_)[A-Za-z0-9+/=_-]+")
_AUTH_SCHEME = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_SECRET_PAIR = re.compile(
    r"""(?P<key>(?:[\w-]*(?:password|passwd|secret)|access_token|refresh_token|id_token
              |admin_token|[\w-]*api[_-]?key|authorization)
         \\?["']?\s*[:=]\s*)
        (?!\\?["']?(?:Bearer|Basic)\s)  # the scheme stays readable; _AUTH_SCHEME masks the rest
        (?P<value>\\?"(?:[^"\\]|\\.)*?\\?"|'[^']*'|[^\s,&;}\]"'\\]+)""",
    re.IGNORECASE | re.VERBOSE,
)


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    for quote in ('\\"', '"', "'"):
        if value.startswith(quote):
            return f"{match.group('key')}{quote}***{quote}"
    return f"{match.group('key')}***"


# Every pattern above needs one of these; most log text has none, and one
# search is far cheaper than four substitutions (job lines are on the hot path).
_MAYBE_SECRET = re.compile(
    r"://|whsec_|whsk_|bearer|basic|passw|secret|token|api[_-]?key|authorization", re.IGNORECASE
)
# The same words as plain substrings, looked for in lower-cased ASCII text. For
# ASCII this finds exactly what _MAYBE_SECRET finds (the further case matches of
# IGNORECASE, such as U+017F long s for "s" or U+212A Kelvin sign for "k", are
# not ASCII), and several times faster than a case-insensitive alternation.
_SECRET_WORDS_LOWER = (
    "://",
    "whsec_",
    "whsk_",
    "bearer",
    "basic",
    "passw",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "authorization",
)

# What every key of _SECRET_PAIR contains, lower-cased (a superset of its keys).
_PAIR_WORDS_LOWER = re.compile(r"passw|secret|token|api[_-]?key|authorization")


def might_contain_secret(text: str) -> bool:
    """Whether `text` contains one of the words every secret pattern needs.

    False means :func:`redact` would return `text` unchanged. No such word spans a
    line break, so texts joined with newlines can be checked in one search.
    """
    if text.isascii():
        return _has_secret_word(text.lower())
    return _MAYBE_SECRET.search(text) is not None


def _has_secret_word(lower: str) -> bool:
    for word in _SECRET_WORDS_LOWER:  # noqa: SIM110 - no generator: this runs per log line
        if word in lower:
            return True
    return False


def redact(text: str) -> str:
    """`text` with URL userinfo and query values, webhook keys, bearer tokens and pairs masked.

    Each pattern runs only when its own words are in `text`: a substitution that
    cannot match changes nothing, and _SECRET_PAIR is slow to find nothing
    (``[\\w-]*`` tries every start in a run of word characters, such as a job
    id), while most redacted text, a failure that names a URL, needs only
    the URL pattern. What one substitution writes in (``***``, ``:***@``, a kept
    scheme) brings no word of a later pattern that was not there before, so the
    words are looked for once, in the text as given.
    """
    if not text.isascii():  # the case-insensitive patterns' further matches: run them all
        if _MAYBE_SECRET.search(text) is None:
            return text
        text = _URL.sub(_mask_url_match, text)
        text = _WEBHOOK_KEY.sub(r"\g<prefix>***", text)
        text = _AUTH_SCHEME.sub(r"\g<scheme> ***", text)
        return _SECRET_PAIR.sub(_mask_value, text)
    lower = text.lower()
    if not _has_secret_word(lower):
        return text
    if "://" in lower:
        text = _URL.sub(_mask_url_match, text)
    if "whsec_" in text or "whsk_" in text:
        text = _WEBHOOK_KEY.sub(r"\g<prefix>***", text)
    if "bearer" in lower or "basic" in lower:
        text = _AUTH_SCHEME.sub(r"\g<scheme> ***", text)
    if _PAIR_WORDS_LOWER.search(lower) is not None:
        text = _SECRET_PAIR.sub(_mask_value, text)
    return text


def mask_url(url: str, *, hide_path: bool = False) -> str:
    """`url` (or each of a comma-separated list) with its userinfo and query values masked.

    A password becomes ``***`` (``amqp://guest:***@host/``), a user name given
    without one is masked whole (it may be a token), and so is every query
    value (``?token=***``). With `hide_path`, the path and query are masked too
    (``https://hooks.example/***``), for URLs whose path is the secret.
    """
    return ",".join(_mask_one_url(part.strip(), hide_path=hide_path) for part in url.split(","))


def _mask_url_match(match: re.Match[str]) -> str:
    return _mask_one_url(match.group(0), hide_path=False)


def _mask_one_url(url: str, *, hide_path: bool) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    if hide_path:
        return f"{scheme}://{authority}" + (f"/{MASK}" if tail.strip("/") else tail)
    path, question, query = tail.partition("?")
    if question:
        query, hash_mark, fragment = query.partition("#")
        query = "&".join(_mask_query_item(item) for item in query.split("&"))
        tail = f"{path}?{query}{hash_mark}{fragment}"
    return f"{scheme}://{authority}{tail}"


def _mask_query_item(item: str) -> str:
    key, equals, value = item.partition("=")
    if not equals:
        return MASK if key else key
    return f"{key}={MASK}" if value else item


_SENSITIVE_KEY = re.compile(
    r"secret|password|passwd|token|authorization|api[-_]?key|cookie|credential", re.IGNORECASE
)


def is_sensitive_key(key: str) -> bool:
    """Whether a JSON key or header name names a secret (`secret`, `api_key`, ...)."""
    return _SENSITIVE_KEY.search(key) is not None


def mask_json(value: Any) -> Any:
    """A copy of decoded JSON with every secret-looking value replaced by `***`."""
    if isinstance(value, dict):
        return {
            key: MASK if isinstance(key, str) and is_sensitive_key(key) else mask_json(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [mask_json(item) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value
