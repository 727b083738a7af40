"""Tests of formcraftd.core.config: defaults, the shipped file, environment, errors, masking."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from formcraftd.core import config
from formcraftd.core.config import Config, RetryConfig
from formcraftd.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config.toml"

# SPEC §3, written out by hand so that a changed default in config.py is noticed.
SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "broker": {
        "url": "amqp://guest:guest@localhost:5672/",
        "queue_type": "classic",
        "connect_timeout_s": 30,
    },
    "http": {"host": "127.0.0.1", "port": 9800, "admin_token": ""},
    "logging": {"level": "info", "format": "json", "sentry_dsn": ""},
    "daemon": {"shutdown_timeout_s": 30, "max_message_bytes": 1048576},
    "events": {"enabled": False, "exchange": "formcraftd.events", "events_per_message": 1},
    "monitoring": {
        "enabled": True,
        "interval_ms": 60000,
        "queue_size_threshold": 1000,
        "error_rate_threshold": 0.5,
        "processing_delay_threshold_ms": 30000,
        "alert_webhook_url": "",
    },
    "retry": {
        "attempts": 3,
        "backoff": "exponential",
        "initial_delay_ms": 1000,
        "max_delay_ms": 60000,
    },
    "breaker": {"failure_threshold": 5, "reset_timeout_ms": 30000, "max_job_age_ms": 86400000},
}
SPEC_WORKERS: dict[str, dict[str, Any]] = {
    "webhook": {
        "enabled": True,
        "queue": "webhook_tasks",
        "dead_letter_exchange": "dlx.webhook",
        "concurrency": 5,
        "timeout_ms": 30000,
        "max_response_bytes": 65536,
        "allow_private_networks": False,
        "allowed_networks": [],
    },
    "email": {
        "enabled": True,
        "queue": "email_tasks",
        "dead_letter_exchange": "dlx.email",
        "concurrency": 3,
        "smtp_host": "localhost",
        "smtp_port": 25,
        "smtp_username": "",
        "smtp_password": "",
        "smtp_security": "none",
        "from_address": "FormCraft <no-reply@localhost>",
        "return_path": "",
        "templates_dir": "",
        "attachments_dir": "",
        "max_attachment_bytes": 10485760,
        "state_dir": "./var",
    },
    "sheets": {
        "enabled": True,
        "queue": "sheets_tasks",
        "dead_letter_exchange": "dlx.sheets",
        "concurrency": 2,
        "client_id": "",
        "client_secret": "",
        "api_root_url": "https://sheets.googleapis.com/",
        "token_url": "https://oauth2.googleapis.com/token",
        "value_input_option": "USER_ENTERED",
        "write_mode": "append",
        "batch_window_ms": 200,
        "batch_max_rows": 500,
        "requests_per_minute_per_user": 60,
        "requests_per_minute": 300,
    },
}


def write_config(folder: Path, text: str, name: str = "config.toml") -> Path:
    """Write `text` as a config file in `folder` and return its path."""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    """Load `text` from a real file with an explicit (default: empty) environment."""
    return config.load(write_config(tmp_path, text), environ=environ or {})


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The ConfigError message that loading `text` raises."""
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    return str(caught.value)


# --- defaults and the shipped file ---------------------------------------------------


@pytest.mark.parametrize("section", sorted(SPEC_DEFAULTS))
def test_section_defaults_equal_the_spec(section: str) -> None:
    """Every top-level section's defaults are the values SPEC §3 shows."""
    data = msgspec.json.decode(msgspec.json.encode(Config()))
    for key, expected in SPEC_DEFAULTS[section].items():
        assert data[section][key] == expected, f"{section}.{key}"


@pytest.mark.parametrize("kind", sorted(SPEC_WORKERS))
def test_worker_defaults_equal_the_spec(kind: str) -> None:
    """Every worker section's defaults are the values SPEC §3 shows."""
    data = msgspec.json.decode(msgspec.json.encode(Config()))
    for key, expected in SPEC_WORKERS[kind].items():
        assert data["workers"][kind][key] == expected, f"workers.{kind}.{key}"


def test_worker_retry_defaults_to_the_global_retry() -> None:
    """Without any retry table every worker uses the SPEC's [retry] defaults."""
    defaults = Config()
    for kind in config.WORKER_KINDS:
        assert defaults.worker(kind).retry == defaults.retry == RetryConfig()


def test_shipped_config_loads_to_the_defaults() -> None:
    """The shipped config.toml equals the built-in defaults, apart from source and paths."""
    loaded = config.load(SHIPPED, environ={})
    expected = config.parse("", source=str(SHIPPED), base_dir=REPO, environ={})
    assert loaded == expected
    assert loaded.source == str(SHIPPED)
    assert loaded.workers.email.state_dir == str(REPO / "var")
    unresolved = msgspec.structs.replace(
        loaded.workers.email, state_dir=Config().workers.email.state_dir
    )
    assert unresolved == Config().workers.email
    assert msgspec.structs.replace(loaded, source="", workers=Config().workers) == Config()


def test_shipped_config_sets_every_spec_key() -> None:
    """Every key of SPEC §3 appears, uncommented, in the shipped config.toml."""
    doc = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    for section, keys in SPEC_DEFAULTS.items():
        assert set(keys) <= set(doc[section]), section
    for kind, keys in SPEC_WORKERS.items():
        assert set(keys) <= set(doc["workers"][kind]), kind


def test_shipped_config_commented_keys_are_valid(tmp_path: Path) -> None:
    """Uncommenting every commented key and table of the shipped file still validates."""
    commented = re.compile(
        r"^# (?=\[workers\.\w+\.retry\]|\[\[workers\.webhook\.tls\]\]|[a-z_]+ = )", re.MULTILINE
    )
    text, count = commented.subn("", SHIPPED.read_text(encoding="utf-8"))
    assert count >= 10
    loaded = load_text(tmp_path, text)
    assert loaded.workers.sheets.single_active_consumer is False
    assert loaded.workers.webhook.retry.attempts == 5
    assert loaded.workers.email.retry.max_delay_ms == 300000
    assert loaded.workers.email.dead_letter_ttl_ms == 604800000
    assert loaded.workers.webhook.tls[0].host == "hooks.example.com"
    assert loaded.workers.webhook.tls[0].client_key == str(tmp_path / "certs" / "client.key")


# --- environment overrides -------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "path", "expected"),
    [
        ("RABBITMQ_URL", "amqp://u:p@rabbit:5673/vh", "broker.url", "amqp://u:p@rabbit:5673/vh"),
        ("FORMCRAFTD_ADMIN_TOKEN", "t0ken", "http.admin_token", "t0ken"),
        ("FORMCRAFTD_HTTP_HOST", "0.0.0.0", "http.host", "0.0.0.0"),
        ("FORMCRAFTD_HTTP_PORT", "9801", "http.port", 9801),
        ("FORMCRAFTD_LOG_FORMAT", "console", "logging.format", "console"),
        ("FORMCRAFTD_LOG_LEVEL", "warning", "logging.level", "warning"),
        (
            "SENTRY_DSN",
            "https://k@sentry.example/1",
            "logging.sentry_dsn",
            "https://k@sentry.example/1",
        ),
        ("WORKER_MONITORING_ENABLED", "false", "monitoring.enabled", False),
        ("WORKER_MONITORING_ENABLED", "1", "monitoring.enabled", True),
        ("WORKER_MONITORING_INTERVAL", "5000", "monitoring.interval_ms", 5000),
        ("WEBHOOK_WORKER_CONCURRENCY", "11", "workers.webhook.concurrency", 11),
        ("EMAIL_WORKER_CONCURRENCY", "7", "workers.email.concurrency", 7),
        ("SHEETS_WORKER_CONCURRENCY", " 4 ", "workers.sheets.concurrency", 4),
        ("SMTP_PASSWORD", "hunter2", "workers.email.smtp_password", "hunter2"),
        (
            "WEBHOOK_PROXY_URL",
            "http://u:p@proxy.internal:4750",
            "workers.webhook.proxy_url",
            "http://u:p@proxy.internal:4750",
        ),
        ("BOUNCES_IMAP_PASSWORD", "imap-pw", "workers.email.bounces.imap_password", "imap-pw"),
        ("MAILGUN_SIGNING_KEY", "key-1", "workers.email.bounces.mailgun_signing_key", "key-1"),
        ("POSTMARK_WEBHOOK_PASSWORD", "pm", "workers.email.bounces.postmark_password", "pm"),
        ("GOOGLE_CLIENT_ID", "cid.apps", "workers.sheets.client_id", "cid.apps"),
        ("GOOGLE_CLIENT_SECRET", "csecret", "workers.sheets.client_secret", "csecret"),
        ("STATE_DIRECTORY", "/var/lib/fcd", "workers.email.state_dir", "/var/lib/fcd"),
        ("DEBUG", "workers:*", "logging.debug_workers", ("*",)),
        ("DEBUG", "workers:webhook", "logging.debug_workers", ("webhook",)),
        ("DEBUG", "workers:webhook,workers:email", "logging.debug_workers", ("webhook", "email")),
    ],
)
def test_environment_overrides_the_file(
    tmp_path: Path, variable: str, value: str, path: str, expected: object
) -> None:
    """Each documented environment variable overrides its key, even one set in the file."""
    section, _, key = path.rpartition(".")
    table = f"[{section}]\n{key} = {orjson.dumps(_file_value(expected)).decode()}\n"
    loaded = load_text(tmp_path, table, {variable: value})
    node: Any = loaded
    for part in path.split("."):
        node = getattr(node, part)
    assert node == expected


def _file_value(expected: object) -> object:
    """A valid file value for the key that differs from what the environment sets."""
    if isinstance(expected, bool):
        return not expected
    if isinstance(expected, int):
        return expected + 1
    if isinstance(expected, tuple):
        return ["sheets"]
    if isinstance(expected, str) and expected.startswith("amqp"):
        return "amqp://file:file@elsewhere/"
    return "from-file"


def test_environment_is_ignored_when_not_set(tmp_path: Path) -> None:
    """With an empty environment the file's values stand."""
    loaded = load_text(tmp_path, "[workers.webhook]\nconcurrency = 9\n")
    assert loaded.workers.webhook.concurrency == 9


def test_process_environment_is_used_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `environ=` the process environment applies."""
    monkeypatch.setenv("EMAIL_WORKER_CONCURRENCY", "8")
    loaded = config.load(write_config(tmp_path, ""))
    assert loaded.workers.email.concurrency == 8


def test_state_directory_takes_the_first_of_several_folders(tmp_path: Path) -> None:
    """systemd's colon-separated STATE_DIRECTORY list: the first folder is the state_dir."""
    loaded = load_text(tmp_path, "", {"STATE_DIRECTORY": "/var/lib/formcraftd:/var/lib/other"})
    assert loaded.workers.email.state_dir == "/var/lib/formcraftd"


def test_empty_state_directory_keeps_the_file_value(tmp_path: Path) -> None:
    """An empty STATE_DIRECTORY names no folder, so state_dir stays as the file says."""
    loaded = load_text(tmp_path, "[workers.email]\nstate_dir = './var'\n", {"STATE_DIRECTORY": ""})
    assert loaded.workers.email.state_dir == str(tmp_path / "var")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WEBHOOK_WORKER_CONCURRENCY", "five"),
        ("EMAIL_WORKER_CONCURRENCY", "1.5"),
        ("SHEETS_WORKER_CONCURRENCY", ""),
        ("WORKER_MONITORING_INTERVAL", "60s"),
        ("WORKER_MONITORING_ENABLED", "maybe"),
    ],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    """A value of the wrong type is a ConfigError naming the variable."""
    message = config_error(tmp_path, "", {variable: value})
    assert variable in message
    assert "\n" not in message


def test_out_of_range_environment_value_names_the_key(tmp_path: Path) -> None:
    """A well-typed but invalid value from the environment names the key it sets."""
    message = config_error(tmp_path, "", {"WEBHOOK_WORKER_CONCURRENCY": "0"})
    assert "workers.webhook.concurrency" in message


@pytest.mark.parametrize(("value", "bound"), [("0", ">= 1"), ("1001", "<= 1000")])
def test_events_per_message_out_of_range_names_the_key(
    tmp_path: Path, value: str, bound: str
) -> None:
    """`[events] events_per_message` takes 1 to 1000; outside that, one line naming the key."""
    message = config_error(tmp_path, f"[events]\nevents_per_message = {value}\n")
    assert "events.events_per_message" in message
    assert bound in message
    assert "\n" not in message


def test_events_per_message_takes_its_bounds(tmp_path: Path) -> None:
    for value in (1, 1000):
        cfg = load_text(tmp_path, f"[events]\nevents_per_message = {value}\n")
        assert cfg.events.events_per_message == value


def test_non_amqp_broker_url_from_environment_is_rejected(tmp_path: Path) -> None:
    """RABBITMQ_URL must be an amqp:// or amqps:// URL."""
    message = config_error(tmp_path, "", {"RABBITMQ_URL": "http://localhost:5672/"})
    assert "broker.url" in message


def test_default_path_follows_formcraftd_config() -> None:
    """The default config path is $FORMCRAFTD_CONFIG, else ./config.toml."""
    assert config.default_path({"FORMCRAFTD_CONFIG": "/etc/f.toml"}) == "/etc/f.toml"
    assert config.default_path({}) == "config.toml"


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ("[brokers]\nurl = 'amqp://x/'\n", "brokers"),
        ("[broker]\nurll = 'amqp://x/'\n", "broker.urll"),
        ("[workers.webhook]\ntimeout = 5\n", "workers.webhook.timeout"),
        ("[workers.ftp]\nenabled = true\n", "workers.ftp"),
        ("[workers.email.retry]\ntries = 2\n", "workers.email.retry.tries"),
        ("[retry]\ntries = 2\n", "retry.tries"),
        ("source = 'x'\n", "source"),
    ],
)
def test_unknown_key_is_one_line_naming_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    """An unknown key anywhere is a one-line ConfigError naming the dotted key and the file."""
    message = config_error(tmp_path, text)
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'config.toml'}: unknown key {key}") + r"( \(did you mean \S+\?\))?",
        message,
    )


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("[http]\nprot = 1\n", " (did you mean http.port?)"),
        ("[brokers]\nurl = 'amqp://x/'\n", " (did you mean broker?)"),
        ("[workers.webhook]\nconcurency = 5\n", " (did you mean workers.webhook.concurrency?)"),
        ("[workers.webhok]\nenabled = true\n", " (did you mean workers.webhook?)"),
        (
            "[workers.email.retry]\nbackof = 'linear'\n",
            " (did you mean workers.email.retry.backoff?)",
        ),
        ("[sheets]\nenabled = true\n", " (did you mean workers.sheets?)"),
        ("colour = 1\n", ""),
        ("[retry]\ntries = 2\n", ""),
    ],
)
def test_an_unknown_key_close_to_a_known_one_gets_a_suggestion(
    tmp_path: Path, text: str, hint: str
) -> None:
    """A typo is answered with the closest key of the same table; nothing close, no hint."""
    message = config_error(tmp_path, text)
    assert message.endswith(hint)
    assert ("did you mean" in message) == bool(hint)


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("[logging]\nlevel = 'verbose'\n", "debug, info, warning, error"),
        ("[broker]\nqueue_type = 'mirrored'\n", "classic, quorum"),
        ("[workers.email]\nsmtp_security = 'ssl'\n", "none, starttls, tls"),
        ("[workers.sheets.retry]\nbackoff = 'cubic'\n", "exponential, linear"),
    ],
)
def test_a_wrong_choice_lists_the_allowed_values(tmp_path: Path, text: str, allowed: str) -> None:
    """A value outside a fixed set of choices is answered with the choices."""
    assert config_error(tmp_path, text).endswith(f" (expected one of: {allowed})")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[http]\nport = '9800'\n", "http.port"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[broker]\nqueue_type = 'mirrored'\n", "broker.queue_type"),
        ("[monitoring]\nerror_rate_threshold = 2.0\n", "monitoring.error_rate_threshold"),
        ("[workers.email]\nsmtp_security = 'ssl'\n", "workers.email.smtp_security"),
        ("[workers.webhook]\nallowed_networks = [1]\n", "workers.webhook.allowed_networks[0]"),
        ("[workers.sheets]\nconcurrency = 0\n", "workers.sheets.concurrency"),
        ("[workers.sheets.retry]\nattempts = 'three'\n", "workers.sheets.retry.attempts"),
        ("[workers]\nemail = 3\n", "workers.email"),
        ("[retry]\ninitial_delay_ms = 5000\nmax_delay_ms = 100\n", "retry"),
    ],
)
def test_wrong_type_names_the_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    """A wrong type or out-of-range value names the dotted key and the file, on one line."""
    message = config_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.toml'}: key {key}:")
    assert "\n" not in message


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    """A TOML syntax error is a one-line ConfigError naming the file."""
    message = config_error(tmp_path, "[broker\nurl = \n")
    assert message.startswith(f"{tmp_path / 'config.toml'}: invalid TOML:")
    assert "\n" not in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: no such config file")):
        config.load(path, environ={})


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that cannot be read as a file (here a folder) is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read config file")):
        config.load(tmp_path, environ={})


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a one-line ConfigError naming it."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"[http]\nadmin_token = '\xff\xfe'\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert str(caught.value).startswith(f"{path}: cannot read config file:")
    assert "\n" not in str(caught.value)


def test_duplicate_queue_names_are_rejected(tmp_path: Path) -> None:
    """Two workers cannot consume the same queue."""
    message = config_error(tmp_path, "[workers.webhook]\nqueue = 'email_tasks'\n")
    assert "workers.email.queue" in message
    assert "workers.webhook.queue" in message


def test_duplicate_dead_letter_exchanges_are_rejected(tmp_path: Path) -> None:
    """Two workers cannot share a dead-letter exchange (their DLQs would mix)."""
    message = config_error(tmp_path, "[workers.sheets]\ndead_letter_exchange = 'dlx.webhook'\n")
    assert "workers.sheets.dead_letter_exchange" in message


# --- retry merging and paths ------------------------------------------------------------


def test_worker_retry_overrides_global_retry_key_by_key(tmp_path: Path) -> None:
    """[workers.X.retry] replaces only the keys it sets; the rest come from [retry]."""
    loaded = load_text(
        tmp_path,
        "[retry]\nattempts = 5\ninitial_delay_ms = 500\n"
        "[workers.email.retry]\nattempts = 2\nbackoff = 'linear'\n",
    )
    assert loaded.workers.email.retry == RetryConfig(
        attempts=2, backoff="linear", initial_delay_ms=500, max_delay_ms=60000
    )
    assert loaded.workers.webhook.retry == RetryConfig(attempts=5, initial_delay_ms=500)
    assert loaded.workers.sheets.retry == loaded.retry


def test_global_retry_applies_to_workers_without_a_workers_table(tmp_path: Path) -> None:
    """[retry] alone (no [workers.*] table at all) is every worker's retry policy."""
    loaded = load_text(tmp_path, "[retry]\nattempts = 7\n")
    for kind in config.WORKER_KINDS:
        assert loaded.worker(kind).retry.attempts == 7


def test_worker_retry_is_validated_after_merging(tmp_path: Path) -> None:
    """A worker override that makes max_delay_ms < initial_delay_ms is rejected for that worker."""
    message = config_error(
        tmp_path, "[retry]\ninitial_delay_ms = 5000\n[workers.sheets.retry]\nmax_delay_ms = 1000\n"
    )
    assert "workers.sheets.retry" in message


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """templates_dir, attachments_dir and state_dir are relative to the config file, not the cwd."""
    folder = tmp_path / "etc" / "formcraftd"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(
        folder,
        "[workers.email]\ntemplates_dir = 'templates'\n"
        "attachments_dir = '../uploads'\nstate_dir = './var'\n",
    )
    email = config.load(path, environ={}).workers.email
    assert email.templates_dir == str(folder / "templates")
    assert email.attachments_dir == str(tmp_path / "etc" / "uploads")
    assert email.state_dir == str(folder / "var")


def test_absolute_and_empty_paths_are_kept(tmp_path: Path) -> None:
    """An absolute path stays as it is and an empty one stays empty."""
    email = load_text(
        tmp_path, f"[workers.email]\nstate_dir = '{tmp_path / 'state'}'\ntemplates_dir = ''\n"
    ).workers.email
    assert email.state_dir == str(tmp_path / "state")
    assert email.templates_dir == ""
    assert email.attachments_dir == ""


# --- masking and immutability --------------------------------------------------------------

SECRETS = {
    "broker": "brokerpass-123",
    "admin": "admintoken-456",
    "smtp": "smtppass-789",
    "google": "googlesecret-abc",
    "sentry": "sentrykey-def",
    "alert": "alertpass-ghi",
    "imap": "imappass-jkl",
    "mailgun": "mailgunkey-mno",
    "postmark": "postmarkpass-pqr",
}


def secret_config(tmp_path: Path) -> Config:
    """A config with a distinctive secret in every secret-bearing key."""
    return load_text(
        tmp_path,
        f"[broker]\nurl = 'amqp://app:{SECRETS['broker']}@rabbit:5672/vh'\n"
        f"[logging]\nsentry_dsn = 'https://{SECRETS['sentry']}@o1.ingest.sentry.io/2'\n"
        f"[monitoring]\nalert_webhook_url = 'https://ops:{SECRETS['alert']}@alerts.example/'\n",
        {
            "FORMCRAFTD_ADMIN_TOKEN": SECRETS["admin"],
            "SMTP_PASSWORD": SECRETS["smtp"],
            "GOOGLE_CLIENT_SECRET": SECRETS["google"],
            "GOOGLE_CLIENT_ID": "visible-client-id",
            "BOUNCES_IMAP_PASSWORD": SECRETS["imap"],
            "MAILGUN_SIGNING_KEY": SECRETS["mailgun"],
            "POSTMARK_WEBHOOK_PASSWORD": SECRETS["postmark"],
        },
    )


def test_masked_hides_every_secret(tmp_path: Path) -> None:
    """masked() replaces the broker password, tokens, SMTP password, client secret and DSN."""
    masked = secret_config(tmp_path).masked()
    assert masked["broker"]["url"] == "amqp://app:***@rabbit:5672/vh"
    assert masked["http"]["admin_token"] == "***"
    assert masked["workers"]["email"]["smtp_password"] == "***"
    assert masked["workers"]["sheets"]["client_secret"] == "***"
    assert masked["logging"]["sentry_dsn"] == "***"
    assert masked["monitoring"]["alert_webhook_url"] == "https://ops:***@alerts.example/"
    assert masked["workers"]["sheets"]["client_id"] == "visible-client-id"
    bounces = masked["workers"]["email"]["bounces"]
    for key in ("imap_password", "mailgun_signing_key", "postmark_password"):
        assert bounces[key] == "***", key


def test_masked_output_never_contains_a_secret(tmp_path: Path) -> None:
    """No secret string appears anywhere in the repr or the JSON of masked()."""
    masked = secret_config(tmp_path).masked()
    rendered = repr(masked) + orjson.dumps(masked).decode()
    for secret in SECRETS.values():
        assert secret not in rendered


def test_masked_handles_a_list_of_broker_urls(tmp_path: Path) -> None:
    """Each URL of a comma-separated broker list has its password masked."""
    loaded = load_text(tmp_path, "[broker]\nurl = 'amqp://a:pw1@n1:5672/,amqp://a:pw2@n2:5672/'\n")
    assert loaded.masked()["broker"]["url"] == "amqp://a:***@n1:5672/,amqp://a:***@n2:5672/"


def test_masked_leaves_empty_secrets_empty() -> None:
    """An unset secret stays empty, so the output shows it is not configured."""
    masked = Config().masked()
    assert masked["http"]["admin_token"] == ""
    assert masked["broker"]["url"] == "amqp://guest:***@localhost:5672/"


def test_config_objects_are_frozen() -> None:
    """Assigning to any config object raises, so a running config cannot drift."""
    loaded = Config()
    with pytest.raises(AttributeError):
        loaded.broker = config.BrokerConfig()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loaded.http.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loaded.workers.email.concurrency = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loaded.workers.webhook.retry.attempts = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "cannot read it"),
        ("version = 2\n", "version = 1"),
        ("[not toml", "invalid"),
    ],
)
def test_a_logging_config_file_is_checked_when_the_config_is_read(
    tmp_path: Path, text: str | None, reason: str
) -> None:
    """check-config, run and a reload refuse a logging.config_file they cannot use."""
    if text is not None:
        (tmp_path / "logging.toml").write_text(text)
    path = tmp_path / "config.toml"
    path.write_text('[logging]\nconfig_file = "logging.toml"\n')
    with pytest.raises(ConfigError, match=f"logging.config_file: .*{reason}"):
        config.load(path, environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("imap_host = 'imap.example'\n", "imap_username is required"),
        (
            "imap_host = 'h'\nimap_username = 'u'\nimap_processed_folder = 'INBOX'\n",
            "must differ from imap_folder",
        ),
        ("imap_folder = 'a\\nb'\n", "plain mailbox name"),
        ("soft_bounce_limit = 0\n", "workers.email.bounces.soft_bounce_limit"),
    ],
)
def test_bad_bounce_settings_are_refused_naming_the_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    """The [workers.email.bounces] table is validated like the rest of the file."""
    message = config_error(tmp_path, "[workers.email.bounces]\n" + text)
    assert fragment in message
    assert "workers.email.bounces" in message
