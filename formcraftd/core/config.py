"""Reading config.toml: environment overrides, validation, one-line errors.

The settings themselves, one frozen msgspec Struct per table, are in
:mod:`formcraftd.core.settings`, re-exported here (`config.Config`,
`config.WebhookWorkerConfig`). `load(path)` reads the file, applies the
environment, validates the whole thing and returns one immutable
:class:`Config`; any problem is a :class:`ConfigError` whose message is one
line naming the file and the key. Reload is the same call: a bad file changes
nothing because nothing is swapped until it validated.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

from formcraftd.core.errors import ConfigError
from formcraftd.core.settings import (
    WORKER_KINDS,
    AnyWorkerConfig,
    BouncesConfig,
    BreakerConfig,
    BrokerConfig,
    Burst,
    Concurrency,
    Config,
    DaemonConfig,
    EmailWorkerConfig,
    EventsConfig,
    Fraction,
    HostRateLimit,
    HttpConfig,
    LoggingConfig,
    MaxPriority,
    MonitoringConfig,
    NonNegativeInt,
    Port,
    PositiveInt,
    QueueName,
    RateLimitConfig,
    RequestsPerSecond,
    RetryConfig,
    SheetsWorkerConfig,
    TracingConfig,
    TtlMs,
    WebhookTlsConfig,
    WebhookWorkerConfig,
    WorkerKind,
    WorkersConfig,
)

__all__ = [
    "WORKER_KINDS",
    "AnyWorkerConfig",
    "BouncesConfig",
    "BreakerConfig",
    "BrokerConfig",
    "Burst",
    "Concurrency",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "EmailWorkerConfig",
    "EventsConfig",
    "Fraction",
    "HostRateLimit",
    "HttpConfig",
    "LoggingConfig",
    "MaxPriority",
    "MonitoringConfig",
    "NonNegativeInt",
    "Port",
    "PositiveInt",
    "QueueName",
    "RateLimitConfig",
    "RequestsPerSecond",
    "RetryConfig",
    "SheetsWorkerConfig",
    "TracingConfig",
    "TtlMs",
    "WebhookTlsConfig",
    "WebhookWorkerConfig",
    "WorkerKind",
    "WorkersConfig",
    "apply_environment",
    "check_egress",
    "check_unsubscribe_url",
    "debug_workers",
    "default_path",
    "load",
    "logging_dict_config",
    "parse",
    "parse_document",
]


# --- environment overrides -------------------------------------------------

# variable -> (path in the document, type)
_ENV_KEYS: dict[str, tuple[tuple[str, ...], type]] = {
    "RABBITMQ_URL": (("broker", "url"), str),
    "FORMCRAFTD_ADMIN_TOKEN": (("http", "admin_token"), str),
    "FORMCRAFTD_HTTP_HOST": (("http", "host"), str),
    "FORMCRAFTD_HTTP_PORT": (("http", "port"), int),
    "SENTRY_DSN": (("logging", "sentry_dsn"), str),
    "FORMCRAFTD_LOG_FORMAT": (("logging", "format"), str),
    "FORMCRAFTD_LOG_LEVEL": (("logging", "level"), str),
    "WORKER_MONITORING_ENABLED": (("monitoring", "enabled"), bool),
    "WORKER_MONITORING_INTERVAL": (("monitoring", "interval_ms"), int),
    "WEBHOOK_WORKER_CONCURRENCY": (("workers", "webhook", "concurrency"), int),
    "EMAIL_WORKER_CONCURRENCY": (("workers", "email", "concurrency"), int),
    "SHEETS_WORKER_CONCURRENCY": (("workers", "sheets", "concurrency"), int),
    "SMTP_PASSWORD": (("workers", "email", "smtp_password"), str),
    "WEBHOOK_PROXY_URL": (("workers", "webhook", "proxy_url"), str),
    "BOUNCES_IMAP_PASSWORD": (("workers", "email", "bounces", "imap_password"), str),
    "MAILGUN_SIGNING_KEY": (("workers", "email", "bounces", "mailgun_signing_key"), str),
    "POSTMARK_WEBHOOK_PASSWORD": (("workers", "email", "bounces", "postmark_password"), str),
    "GOOGLE_CLIENT_ID": (("workers", "sheets", "client_id"), str),
    "GOOGLE_CLIENT_SECRET": (("workers", "sheets", "client_secret"), str),
    # Set by systemd for a unit with StateDirectory= (the shipped unit: /var/lib/formcraftd,
    # its only writable folder under ProtectSystem=strict), so the unit decides where the
    # state lives and the shipped "./var" serves a checkout.
    "STATE_DIRECTORY": (("workers", "email", "state_dir"), Path),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_value(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"environment {name}: expected true/false, got {raw!r}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"environment {name}: expected an integer, got {raw!r}") from None
    if kind is Path:
        # systemd joins several StateDirectory= folders with ":"; the first is ours.
        return raw.split(":", 1)[0]
    return raw


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    node = doc
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"key {'.'.join(path[:-1])}: expected a table")
        node = child
    node[path[-1]] = value


def debug_workers(debug: str) -> tuple[str, ...]:
    """The worker kinds that `DEBUG` turns on: `workers:*` = all, `workers:webhook,...`."""
    kinds: list[str] = []
    for item in re.split(r"[,\s]+", debug.strip()):
        if item in {"workers:*", "*"}:
            return ("*",)
        if item.startswith("workers:"):
            kinds.append(item.removeprefix("workers:"))
    return tuple(kinds)


def apply_environment(doc: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, (path, kind) in _ENV_KEYS.items():
        if name not in environ or (kind is Path and not environ[name]):
            continue  # an empty folder list leaves the key alone
        _set_path(doc, path, _env_value(name, environ[name], kind))
    if environ.get("DEBUG"):
        _set_path(doc, ("logging", "debug_workers"), list(debug_workers(environ["DEBUG"])))


# --- loading -----------------------------------------------------------------

_UNKNOWN = re.compile(
    r"Object contains unknown field `(?P<field>[^`]*)`(?: - at `\$(?P<at>[^`]*)`)?"
)
_AT = re.compile(r" - at `\$(?P<at>[^`]*)`$")


def _dotted(at: str) -> str:
    return re.sub(r"\[(\d+)\]", r"[\1]", at).lstrip(".")


def _explain(error: msgspec.ValidationError, source: str, environ: Mapping[str, str]) -> str:
    text = str(error)
    unknown = _UNKNOWN.match(text)
    if unknown:
        at = _dotted(unknown.group("at") or "")
        key = f"{at}.{unknown.group('field')}" if at else unknown.group("field")
        return f"{source}: unknown key {key}{_did_you_mean(at, unknown.group('field'))}"
    at_match = _AT.search(text)
    if at_match:
        key = _dotted(at_match.group("at"))
        origin = next(
            (
                f" (from environment {name})"
                for name, (path, _) in _ENV_KEYS.items()
                if name in environ and ".".join(path) == key
            ),
            "",
        )
        reason = text[: at_match.start()]
        if reason.startswith("Invalid enum value"):
            allowed = _literal_values(_type_at(key))
            if allowed:
                reason += f" (expected one of: {', '.join(allowed)})"
        return f"{source}: key {key}{origin}: {reason}"
    return f"{source}: {text}"


def _type_at(key: str) -> Any:
    """The annotation of the config key `key` (dotted), or None when there is none."""
    kind: Any = Config
    for part in key.split("."):
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return None
        fields = {field.name: field.type for field in msgspec.structs.fields(kind)}
        if part not in fields or (kind is Config and part == "source"):
            return None
        kind = fields[part]
    return kind


def _literal_values(kind: Any) -> list[str]:
    """The values a Literal type allows (looking inside Annotated and unions)."""
    if get_origin(kind) is Literal:
        return [str(value) for value in get_args(kind)]
    return [value for arg in get_args(kind) for value in _literal_values(arg)]


def _did_you_mean(table: str, key: str) -> str:
    """` (did you mean http.port?)` when `key` is close to a key of `table`, else ""."""
    if not table and key in WORKER_KINDS:
        return f" (did you mean workers.{key}?)"
    kind = _type_at(table) if table else Config
    if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return ""
    known = [field.name for field in msgspec.structs.fields(kind) if field.name != "source"]
    matches = difflib.get_close_matches(key, known, n=1)
    if not matches:
        return ""
    return f" (did you mean {f'{table}.' if table else ''}{matches[0]}?)"


def _merge_worker_retry(doc: dict[str, Any]) -> None:
    """A `[workers.X.retry]` table overrides `[retry]` key by key."""
    base = doc.get("retry", {})
    workers = doc.setdefault("workers", {})
    if not isinstance(base, dict) or not isinstance(workers, dict):
        return
    for kind in WORKER_KINDS:
        section = workers.get(kind)
        if section is None:
            section = workers[kind] = {}
        if not isinstance(section, dict):
            continue
        override = section.get("retry", {})
        if isinstance(override, dict):
            section["retry"] = {**base, **override}


def _resolve_paths(config: Config, base: Path) -> Config:
    email = config.workers.email
    webhook = config.workers.webhook

    def resolve(value: str) -> str:
        return str((base / value).resolve()) if value else value

    webhook = msgspec.structs.replace(
        webhook,
        tls=tuple(
            msgspec.structs.replace(
                entry,
                client_cert=resolve(entry.client_cert),
                client_key=resolve(entry.client_key),
                ca_file=resolve(entry.ca_file),
            )
            for entry in webhook.tls
        ),
    )

    email = msgspec.structs.replace(
        email,
        templates_dir=resolve(email.templates_dir),
        attachments_dir=resolve(email.attachments_dir),
        state_dir=resolve(email.state_dir),
    )
    workers = msgspec.structs.replace(config.workers, email=email, webhook=webhook)
    logging = msgspec.structs.replace(
        config.logging, config_file=resolve(config.logging.config_file)
    )
    return msgspec.structs.replace(config, workers=workers, logging=logging)


def logging_dict_config(path: str) -> dict[str, Any]:
    """The `logging.config_file` document: a dictConfig schema (version 1), JSON or TOML."""
    where = f"key logging.config_file: {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{where}: cannot read it: {reason}") from None
    try:
        document: object = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: invalid {Path(path).suffix or 'TOML'}: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != 1:
        raise ConfigError(f"{where}: expected a logging.config.dictConfig table with version = 1")
    return document


def _check_cross_fields(config: Config, source: str) -> None:
    names: dict[str, str] = {}
    for kind in WORKER_KINDS:
        worker = config.worker(kind)
        for key, name in (
            ("queue", worker.queue),
            ("dead_letter_exchange", worker.dead_letter_exchange),
        ):
            if name in names:
                raise ConfigError(
                    f"{source}: key workers.{kind}.{key}: {name!r} is already used by {names[name]}"
                )
            names[name] = f"workers.{kind}.{key}"
    for url in config.broker.url.split(","):
        if urlsplit(url.strip()).scheme not in ("amqp", "amqps"):
            raise ConfigError(f"{source}: key broker.url: expected amqp:// or amqps:// URLs")
    unsubscribe = config.workers.email.unsubscribe_url
    if unsubscribe and (problem := check_unsubscribe_url(unsubscribe)):
        raise ConfigError(f"{source}: key workers.email.unsubscribe_url: {problem}")
    for cidr in config.workers.webhook.allowed_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"{source}: key workers.webhook.allowed_networks: {cidr[:100]!r} is not a CIDR"
            ) from None
    try:
        check_egress(config.workers.webhook)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _is_host_name(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_egress(webhook: WebhookWorkerConfig) -> None:
    """Raise a one-line :class:`ConfigError` naming the key for a bad proxy or TLS entry.

    The webhook worker parses `no_proxy` and reads the files of the TLS entries
    (check-config, start and reload all build its routes and TLS contexts).
    """
    key = "key workers.webhook"
    if webhook.proxy_url:
        parts = urlsplit(webhook.proxy_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "http" or not parts.hostname or port == -1:
            raise ConfigError(
                f"{key}.proxy_url: expected http://[user:password@]host:port (an HTTP proxy)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{key}.proxy_url: a proxy URL has no path, query or fragment")
    seen: set[str] = set()
    for i, tls in enumerate(webhook.tls):
        at = f"{key}.tls[{i}]"
        host = tls.host.lower().removesuffix(".")
        name = host.removeprefix("*.")
        if not name or not (_is_host_name(name) or (host == name and _is_ip(host.strip("[]")))):
            raise ConfigError(
                f"{at}.host: {tls.host[:100]!r} is not a host name, IP or *.domain pattern"
            )
        if host in seen:
            raise ConfigError(f"{at}.host: {tls.host[:100]!r} already has an entry")
        seen.add(host)
        if not tls.client_cert and not tls.ca_file:
            raise ConfigError(f"{at}: give client_cert, ca_file or both")
        if tls.client_key and not tls.client_cert:
            raise ConfigError(f"{at}.client_key: needs client_cert")


UNSUBSCRIBE_PLACEHOLDERS = ("form_id", "submission_id", "job_id", "recipient")
# What RFC 3986 allows in a URL, the percent sign included; no space, quote or angle bracket.
_URL_TEXT = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
MAX_UNSUBSCRIBE_TEMPLATE = 900  # the header line is at most 998 characters, values included


def check_unsubscribe_url(template: str) -> str:
    """Why `template` cannot be the unsubscribe URL template, or "" when it can."""
    if len(template) > MAX_UNSUBSCRIBE_TEMPLATE:
        return f"longer than {MAX_UNSUBSCRIBE_TEMPLATE} characters"
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a template: {exc}"
    for literal, name, spec, conversion in fields:
        if not _URL_TEXT.fullmatch(literal):
            return "only URL characters may appear outside the placeholders (no space, quote, <>)"
        if name is None:
            continue
        if name not in UNSUBSCRIBE_PLACEHOLDERS:
            known = ", ".join(f"{{{known}}}" for known in UNSUBSCRIBE_PLACEHOLDERS)
            return f"unknown placeholder {{{name}}} (known: {known})"
        if spec or conversion:
            return f"placeholder {{{name}}} takes no conversion or format"
    parts = urlsplit(template)
    if parts.scheme != "https" or not parts.hostname:
        return "expected an https:// URL (RFC 8058 one-click unsubscribe needs HTTPS)"
    if "{" in parts.netloc:
        return "placeholders may appear only in the path and query"
    return ""


def parse(
    text: str,
    *,
    source: str = "config.toml",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate TOML `text` (plus the environment) into a :class:`Config`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_document(doc, source=source, base_dir=base_dir, environ=environ)


def parse_document(
    doc: dict[str, Any],
    *,
    source: str = "config.toml",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate an already-parsed TOML document (a dict) into a :class:`Config`."""
    doc = copy.deepcopy(doc)
    if "source" in doc:
        raise ConfigError(f"{source}: unknown key source")
    environ = os.environ if environ is None else environ
    apply_environment(doc, environ)
    _merge_worker_retry(doc)
    doc["source"] = source
    try:
        config = msgspec.convert(doc, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, source, environ)) from None
    _check_cross_fields(config, source)
    config = _resolve_paths(config, base_dir or Path.cwd())
    if config.logging.config_file:
        logging_dict_config(config.logging.config_file)
    return config


def load(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{file}: cannot read config file: {reason}") from None
    return parse(text, source=str(file), base_dir=file.resolve().parent, environ=environ)


def default_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("FORMCRAFTD_CONFIG") or "config.toml"
