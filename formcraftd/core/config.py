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
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import msgspec

from formcraftd.core.config_checks import check_cross_fields
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
    check_cross_fields(config, source)
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
