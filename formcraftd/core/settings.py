"""The shape of config.toml: one frozen msgspec Struct per table, with its defaults.

:mod:`formcraftd.core.config` reads a file into these (environment overrides,
validation, one-line errors); everything else only reads them. Each Struct
validates what msgspec's annotations cannot say in its `__post_init__`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

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


# Events per AMQP message: 1 is one JSON object per message; more, a JSON array.
EventsPerMessage = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class EventsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    exchange: QueueName = "formcraftd.events"
    events_per_message: EventsPerMessage = 1


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
