"""config.toml as frozen msgspec Structs, with environment overrides.

`load(path)` reads the file, applies the environment, validates the whole thing
and returns one immutable :class:`Config`; any problem is a :class:`ConfigError`
whose message is one line naming the file and the key. Reload is the same call:
a bad file changes nothing because nothing is swapped until it validated.
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
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

from formcraftd.core.errors import ConfigError
from formcraftd.core.redaction import mask_url

WorkerKind = Literal["webhook", "email", "sheets"]
WORKER_KINDS: tuple[WorkerKind, ...] = ("webhook", "email", "sheets")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
QueueName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class BrokerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = "amqp://guest:guest@localhost:5672/"
    queue_type: Literal["classic", "quorum"] = "classic"
    connect_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    heartbeat_s: NonNegativeInt = 30
    delivery_limit: PositiveInt = 20  # quorum queues only: x-delivery-limit


class HttpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 9800
    admin_token: str = ""


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    sentry_dsn: str = ""
    debug_workers: tuple[str, ...] = ()  # from DEBUG=workers:<kind>; "*" = all
    config_file: str = ""  # extra handlers: a logging.config.dictConfig file (JSON or TOML)


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    shutdown_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    max_message_bytes: PositiveInt = 1_048_576
    settled_memory_s: NonNegativeInt = 3600  # how long a settled delivery is remembered
    settled_memory_size: NonNegativeInt = 100_000  # ... and how many at most (0 = off)
    max_redeliveries: PositiveInt = 5  # classic queues: redeliveries before dead-lettering


class EventsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    exchange: QueueName = "formcraftd.events"


class TracingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # OpenTelemetry (the extra formcraftd[otel]); the rest comes from the OTEL_* variables.
    enabled: bool = False


class MonitoringConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    interval_ms: PositiveInt = 60_000
    queue_size_threshold: NonNegativeInt = 1000
    error_rate_threshold: Fraction = 0.5
    processing_delay_threshold_ms: PositiveInt = 30_000
    alert_webhook_url: str = ""


# RabbitMQ takes a message TTL (x-message-ttl: the retry wait queues, dead-letter
# retention) of at most 2**32 - 1 ms, about 49.7 days.
TtlMs = Annotated[int, msgspec.Meta(ge=1, le=4_294_967_295)]


class RetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    attempts: PositiveInt = 3
    backoff: Literal["exponential", "linear"] = "exponential"
    initial_delay_ms: TtlMs = 1000
    max_delay_ms: TtlMs = 60_000

    def __post_init__(self) -> None:
        if self.max_delay_ms < self.initial_delay_ms:
            raise ValueError("max_delay_ms must be >= initial_delay_ms")


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    failure_threshold: PositiveInt = 5
    reset_timeout_ms: PositiveInt = 30_000
    max_job_age_ms: PositiveInt = 86_400_000


Concurrency = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
# AMQP priorities are an octet; RabbitMQ recommends at most 10 levels.
MaxPriority = Annotated[int, msgspec.Meta(ge=0, le=255)]


class _WorkerBase(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What every worker section has; `queue`, `dead_letter_exchange` and
    `concurrency` are declared by each subclass with its own default."""

    enabled: bool = True
    retry: RetryConfig = RetryConfig()
    dead_letter_ttl_ms: TtlMs | None = None
    # x-max-priority of the main queue (classic queues); 0 = no priorities
    max_priority: MaxPriority = 0


RequestsPerSecond = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]
Burst = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]

# A destination's host: a name or an IPv4 address, `*.` + a domain for every host
# under it, or a bracketed IPv6 address; optionally `:port` for that port only.
_HOST_PATTERN = re.compile(
    r"^(?:\*\.)?(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?::[0-9]{1,5})?$|^\[[0-9a-f:.]+\](?::[0-9]{1,5})?$"
)


class HostRateLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A rate for the destinations whose host matches `host` (overrides the section's)."""

    host: Annotated[str, msgspec.Meta(min_length=1, max_length=260)]
    requests_per_second: RequestsPerSecond
    burst: Burst | None = None  # None: the section's burst

    def __post_init__(self) -> None:
        if not _HOST_PATTERN.match(self.host):
            raise ValueError(
                "host must be a host name, `*.` and a domain, or an IP address "
                "(lowercase, optionally with :port)"
            )


class RateLimitConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-destination (`host:port`) rate limits of the webhook worker."""

    requests_per_second: RequestsPerSecond = 0.0  # every destination's own rate; 0 = no limit
    burst: Burst = 10
    max_wait_ms: NonNegativeInt = 1000  # longest wait in the process; longer: a wait queue
    recovery_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    max_in_flight: NonNegativeInt = 0  # jobs of one destination under way at once; 0 = no cap
    hosts: tuple[HostRateLimit, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.hosts:
            if rule.host in seen:
                raise ValueError(f"host {rule.host!r} is given twice")
            seen.add(rule.host)


class WebhookTlsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[workers.webhook.tls]]` entry: TLS settings for the hosts it matches."""

    host: str  # "hooks.example.com", or "*.example.com" for every name under it
    client_cert: str = ""  # PEM certificate chain presented to the destination (mTLS)
    client_key: str = ""  # its PEM private key, unencrypted; empty = inside client_cert
    ca_file: str = ""  # PEM CA bundle that replaces the system CAs for these hosts


class WebhookWorkerConfig(_WorkerBase, frozen=True, kw_only=True, forbid_unknown_fields=True):
    queue: QueueName = "webhook_tasks"
    dead_letter_exchange: QueueName = "dlx.webhook"
    concurrency: Concurrency = 5
    timeout_ms: PositiveInt = 30_000
    max_response_bytes: NonNegativeInt = 65_536
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    rate_limit: RateLimitConfig = RateLimitConfig()
    proxy_url: str = ""  # http://[user:password@]host:port; empty = connect directly
    no_proxy: tuple[str, ...] = ()  # hosts, .suffixes, IPs or CIDRs sent direct; "*" = all
    tls: tuple[WebhookTlsConfig, ...] = ()


class BouncesConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[workers.email.bounces]`: where bounces and complaints come from, and the policy.

    The IMAP mailbox is read while `imap_host` is set; `/bounces/mailgun` answers
    while `mailgun_signing_key` is set, `/bounces/postmark` while
    `postmark_password` is. Sent jobs are remembered for `sent_memory_s` when
    any of the three is on, so a later bounce can name its job.
    """

    imap_host: str = ""  # empty = no bounce mailbox
    imap_port: Port = 993
    imap_security: Literal["tls", "none"] = "tls"
    imap_username: str = ""
    imap_password: str = ""
    imap_folder: str = "INBOX"
    imap_processed_folder: str = "formcraftd-processed"
    imap_poll_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # without IDLE
    imap_idle_s: Annotated[float, msgspec.Meta(gt=0, le=1740)] = 600.0  # re-IDLE this often
    imap_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    imap_max_message_bytes: PositiveInt = 1_048_576  # read at most this much of a message
    mailgun_signing_key: str = ""
    # older signed timestamps are refused (replays); tokens are remembered for an hour
    mailgun_max_age_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    postmark_username: str = "postmark"
    postmark_password: str = ""
    soft_bounce_limit: PositiveInt = 3  # soft bounces of one address within the window ...
    soft_bounce_window_s: PositiveInt = 604_800  # ... (7 days) that suppress it ...
    soft_suppression_s: PositiveInt = 259_200  # ... for this long (3 days), then try again
    sent_memory_s: PositiveInt = 1_209_600  # how long a sent job is remembered (14 days)

    @property
    def mailbox_enabled(self) -> bool:
        return bool(self.imap_host)

    @property
    def enabled(self) -> bool:
        """Whether any intake is on (and so sent jobs are remembered)."""
        return bool(self.imap_host or self.mailgun_signing_key or self.postmark_password)

    def __post_init__(self) -> None:
        if self.imap_host and not self.imap_username:
            raise ValueError("imap_username is required when imap_host is set")
        if self.imap_host and self.imap_processed_folder == self.imap_folder:
            raise ValueError("imap_processed_folder must differ from imap_folder")
        for name in ("imap_folder", "imap_processed_folder"):
            value = getattr(self, name)
            if not value or _CONTROL_CHARS.search(value) or '"' in value or "\\" in value:
                raise ValueError(f"{name} must be a plain mailbox name")


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class EmailWorkerConfig(_WorkerBase, frozen=True, kw_only=True, forbid_unknown_fields=True):
    queue: QueueName = "email_tasks"
    dead_letter_exchange: QueueName = "dlx.email"
    concurrency: Concurrency = 3
    smtp_host: str = "localhost"
    smtp_port: Port = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    from_address: str = "FormCraft <no-reply@localhost>"
    return_path: str = ""
    templates_dir: str = ""
    attachments_dir: str = ""
    max_attachment_bytes: PositiveInt = 10_485_760
    max_attachments_total_bytes: PositiveInt = 26_214_400  # all of one job's attachments
    state_dir: str = "./var"
    # RFC 8058 one-click unsubscribe: an https URL template ("" = no List-Unsubscribe)
    unsubscribe_url: str = ""
    bounces: BouncesConfig = BouncesConfig()


class SheetsWorkerConfig(_WorkerBase, frozen=True, kw_only=True, forbid_unknown_fields=True):
    queue: QueueName = "sheets_tasks"
    dead_letter_exchange: QueueName = "dlx.sheets"
    concurrency: Concurrency = 2
    client_id: str = ""
    client_secret: str = ""
    api_root_url: str = "https://sheets.googleapis.com/"
    token_url: str = "https://oauth2.googleapis.com/token"
    value_input_option: Literal["USER_ENTERED", "RAW"] = "USER_ENTERED"
    write_mode: Literal["append", "update"] = "append"
    batch_window_ms: NonNegativeInt = 200
    batch_max_rows: PositiveInt = 500
    requests_per_minute_per_user: PositiveInt = 60
    requests_per_minute: PositiveInt = 300
    single_active_consumer: bool = False


class WorkersConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    webhook: WebhookWorkerConfig = WebhookWorkerConfig()
    email: EmailWorkerConfig = EmailWorkerConfig()
    sheets: SheetsWorkerConfig = SheetsWorkerConfig()


AnyWorkerConfig = WebhookWorkerConfig | EmailWorkerConfig | SheetsWorkerConfig


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    broker: BrokerConfig = BrokerConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    daemon: DaemonConfig = DaemonConfig()
    events: EventsConfig = EventsConfig()
    tracing: TracingConfig = TracingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    workers: WorkersConfig = WorkersConfig()
    source: str = ""  # the file this was read from ("" = defaults only)

    def worker(self, kind: WorkerKind) -> AnyWorkerConfig:
        section: AnyWorkerConfig = getattr(self.workers, kind)
        return section

    def enabled_workers(self) -> list[tuple[WorkerKind, AnyWorkerConfig]]:
        return [(kind, self.worker(kind)) for kind in WORKER_KINDS if self.worker(kind).enabled]

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data with every secret masked."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        data["broker"]["url"] = mask_url(self.broker.url)
        for section, key in _SECRET_KEYS:
            node = data
            for part in section:
                node = node[part]
            if node.get(key):
                node[key] = "***"
        proxy_url = self.workers.webhook.proxy_url
        if proxy_url:
            data["workers"]["webhook"]["proxy_url"] = mask_url(proxy_url)
        alert_url = self.monitoring.alert_webhook_url
        if alert_url:
            data["monitoring"]["alert_webhook_url"] = mask_url(alert_url, hide_path=True)
        return data


_SECRET_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("http",), "admin_token"),
    (("logging",), "sentry_dsn"),
    (("workers", "email"), "smtp_password"),
    (("workers", "email", "bounces"), "imap_password"),
    (("workers", "email", "bounces"), "mailgun_signing_key"),
    (("workers", "email", "bounces"), "postmark_password"),
    (("workers", "sheets"), "client_secret"),
)


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
