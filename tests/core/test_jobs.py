"""Tests of formcraftd.core.jobs: the seed's job shapes, validation, job ids and schemas."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import orjson
import pytest

from formcraftd.core import jobs
from formcraftd.core.errors import FormcraftError
from formcraftd.core.handler import Delivered
from formcraftd.core.jobs import EmailJob, JobInvalid, SheetsJob, WebhookJob

# The three shapes of seed/workers-and-background-jobs.md, with every field set.
WEBHOOK: dict[str, Any] = {
    "type": "webhook.send",
    "payload": {
        "url": "https://hooks.example.com/formcraft?x=1",
        "method": "POST",
        "headers": {"X-Custom": "yes"},
        "body": {"answers": [{"q": "name", "a": "Ada"}], "n": 1},
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    },
    "metadata": {"formId": "form_1", "submissionId": "sub_1", "retryCount": 0},
}
EMAIL: dict[str, Any] = {
    "type": "email.send",
    "payload": {
        "to": ["ada@example.com", "bob@example.com"],
        "subject": "New submission for {{ form_name }}",
        "template": "submission",
        "data": {"form_name": "Contact", "fields": {"name": "Ada"}},
        "attachments": [{"filename": "cv.pdf", "path": "uploads/cv.pdf"}],
    },
    "metadata": {"formId": "form_1", "submissionId": "sub_1"},
}
SHEETS: dict[str, Any] = {
    "type": "sheets.update",
    "payload": {
        "spreadsheetId": "1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms",
        "range": "Sheet1!A1",
        "values": [["Ada", 36, True, None]],
        "auth": {
            "access_token": "ya29.a0Af",
            "refresh_token": "1//0g-refresh",
            "expiry_date": 1714567890123,
        },
    },
    "metadata": {"formId": "form_1", "submissionId": "sub_1"},
}
SEEDS = {"webhook": WEBHOOK, "email": EMAIL, "sheets": SHEETS}


def body_of(message: dict[str, Any]) -> bytes:
    """A message dict as the JSON bytes a publisher would send."""
    return orjson.dumps(message)


def changed(message: dict[str, Any], path: str, value: Any) -> bytes:
    """`message` with the dotted `path` set to `value` (or removed when value is ...)."""
    result = copy.deepcopy(message)
    node = result
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return body_of(result)


def assert_invalid(body: bytes) -> str:
    """Assert that `body` is rejected with JobInvalid and return its one-line reason."""
    with pytest.raises(JobInvalid) as caught:
        jobs.decode(body)
    reason = str(caught.value)
    assert reason
    assert "\n" not in reason
    return reason


# --- the seed shapes --------------------------------------------------------------------


def test_webhook_seed_shape_decodes() -> None:
    """The seed's webhook.send message decodes to a WebhookJob with every field."""
    job = jobs.decode(body_of(WEBHOOK))
    assert isinstance(job, WebhookJob)
    assert job.payload.url == "https://hooks.example.com/formcraft?x=1"
    assert job.payload.method == "POST"
    assert job.payload.headers == {"X-Custom": "yes"}
    assert job.payload.body == WEBHOOK["payload"]["body"]
    assert job.payload.secret.startswith("whsec_")
    assert (job.metadata.form_id, job.metadata.submission_id) == ("form_1", "sub_1")
    assert job.metadata.retry_count == 0
    assert jobs.kind_of(job) == "webhook"


def test_email_seed_shape_decodes() -> None:
    """The seed's email.send message decodes to an EmailJob with every field."""
    job = jobs.decode(body_of(EMAIL))
    assert isinstance(job, EmailJob)
    assert job.payload.to == ["ada@example.com", "bob@example.com"]
    assert job.payload.template == "submission"
    assert job.payload.data["fields"] == {"name": "Ada"}
    assert job.payload.attachments[0].filename == "cv.pdf"
    assert job.payload.attachments[0].path == "uploads/cv.pdf"
    assert job.metadata.submission_id == "sub_1"
    assert jobs.kind_of(job) == "email"


def test_sheets_seed_shape_decodes() -> None:
    """The seed's sheets.update message decodes to a SheetsJob with every field."""
    job = jobs.decode(body_of(SHEETS))
    assert isinstance(job, SheetsJob)
    assert job.payload.spreadsheet_id == SHEETS["payload"]["spreadsheetId"]
    assert job.payload.range == "Sheet1!A1"
    assert job.payload.values == [["Ada", 36, True, None]]
    assert job.payload.auth.refresh_token == "1//0g-refresh"
    assert job.payload.auth.expiry_date == 1714567890123
    assert jobs.kind_of(job) == "sheets"


def test_optional_fields_take_their_defaults() -> None:
    """Fields the seed marks optional, or that publishers leave out, get defaults."""
    webhook = jobs.decode(
        body_of(
            {
                "type": "webhook.send",
                "payload": {"url": "http://example.com/"},
                "metadata": {"formId": "f", "submissionId": "s"},
            }
        )
    )
    assert isinstance(webhook, WebhookJob)
    assert (webhook.payload.method, webhook.payload.headers) == ("POST", {})
    assert (webhook.payload.body, webhook.payload.secret) == (None, "")
    email = jobs.decode(changed(EMAIL, "payload.attachments", ...))
    assert isinstance(email, EmailJob)
    assert email.payload.attachments == []


def test_metadata_may_carry_extra_keys() -> None:
    """Unknown metadata keys from the app are tolerated, not a validation error."""
    job = jobs.decode(changed(EMAIL, "metadata.traceId", "abc"))
    assert job.metadata.form_id == "form_1"


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_encode_decode_round_trip(kind: str) -> None:
    """decode(encode(job)) == job, and the encoding keeps the wire format's names."""
    job = jobs.decode(body_of(SEEDS[kind]))
    encoded = jobs.encode(job)
    assert jobs.decode(encoded) == job
    wire = orjson.loads(encoded)
    assert wire["type"] == SEEDS[kind]["type"]
    assert wire["metadata"]["formId"] == "form_1"
    assert wire["payload"].keys() >= SEEDS[kind]["payload"].keys()


# --- invalid messages ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"not json", b"{", b'{"type": "webhook.send",}'])
def test_not_json_is_invalid(body: bytes) -> None:
    """A body that is not JSON is JobInvalid."""
    assert_invalid(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xfe{}", id="leading-bytes"),
        pytest.param(
            body_of(EMAIL).replace(b"submission", b"submissi\xc3\x28n", 1), id="inside-a-string"
        ),
    ],
)
def test_invalid_utf8_is_invalid(body: bytes) -> None:
    """A body with invalid UTF-8, anywhere, is JobInvalid."""
    assert_invalid(body)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"webhook.send"',
        b"42",
        b"null",
        changed(WEBHOOK, "payload", "https://example.com"),
        changed(EMAIL, "payload.to", "ada@example.com"),
        changed(SHEETS, "payload.values", ["a", "b"]),
        changed(WEBHOOK, "metadata", []),
    ],
)
def test_wrong_shape_is_invalid(body: bytes) -> None:
    """A body of the wrong JSON shape is JobInvalid."""
    assert_invalid(body)


@pytest.mark.parametrize("job_type", ["sms.send", "webhook", "", None])
def test_unknown_type_is_invalid(job_type: str | None) -> None:
    """A `type` that names no worker is JobInvalid."""
    assert_invalid(changed(WEBHOOK, "type", job_type))


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (WEBHOOK, "type"),
        (WEBHOOK, "payload"),
        (WEBHOOK, "metadata"),
        (WEBHOOK, "payload.url"),
        (WEBHOOK, "metadata.formId"),
        (EMAIL, "payload.to"),
        (EMAIL, "payload.subject"),
        (EMAIL, "payload.template"),
        (EMAIL, "metadata.submissionId"),
        (SHEETS, "payload.spreadsheetId"),
        (SHEETS, "payload.range"),
        (SHEETS, "payload.auth"),
        (SHEETS, "payload.auth.refresh_token"),
        (SHEETS, "payload.auth.expiry_date"),
    ],
)
def test_missing_field_is_invalid(message: dict[str, Any], path: str) -> None:
    """A missing required field is JobInvalid."""
    assert_invalid(changed(message, path, ...))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "/relative/hook",
        "example.com/hook",
        "http://",
        "https://[::1",
        "",
    ],
)
def test_non_http_or_relative_url_is_invalid(url: str) -> None:
    """Only absolute http(s) URLs with a host are accepted."""
    assert_invalid(changed(WEBHOOK, "payload.url", url))


@pytest.mark.parametrize("method", ["GET", "DELETE", "post", "PATCH"])
def test_methods_other_than_post_and_put_are_invalid(method: str) -> None:
    """The seed allows POST and PUT only."""
    assert_invalid(changed(WEBHOOK, "payload.method", method))


def test_put_is_accepted() -> None:
    """PUT is the seed's other method."""
    job = jobs.decode(changed(WEBHOOK, "payload.method", "PUT"))
    assert isinstance(job, WebhookJob)
    assert job.payload.method == "PUT"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nSet-Cookie: x=1"},
        {"X-Evil": "a\nb"},
        {"X-Evil\r\nHost": "b"},
        {"X-Nul": "a\x00b"},
        {"": "empty name"},
        {"Bad:Name": "v"},
        {"X-Number": 1},
    ],
)
def test_header_injection_is_invalid(headers: dict[str, Any]) -> None:
    """Header names or values with CR, LF, NUL or a colon in the name are JobInvalid."""
    assert_invalid(changed(WEBHOOK, "payload.headers", headers))


def test_empty_recipient_list_is_invalid() -> None:
    """An email without any recipient is JobInvalid."""
    assert_invalid(changed(EMAIL, "payload.to", []))


def test_empty_sheet_values_are_invalid() -> None:
    """A sheets job without rows is JobInvalid."""
    assert_invalid(changed(SHEETS, "payload.values", []))


@pytest.mark.parametrize(
    ("message", "path", "value"),
    [
        (WEBHOOK, "metadata.formId", "f" * 1025),
        (WEBHOOK, "metadata.submissionId", "s" * 1025),
        (WEBHOOK, "metadata.retryCount", -1),
        (WEBHOOK, "payload.url", "https://example.com/" + "a" * 8192),
        (WEBHOOK, "payload.secret", "x" * 4097),
        (WEBHOOK, "payload.headers", {f"X-H{i}": "v" for i in range(101)}),
        (EMAIL, "payload.to", ["a@example.com"] * 1001),
        (EMAIL, "payload.to", ["a" * 310 + "@example.com"]),
        (EMAIL, "payload.subject", "s" * 4097),
        (EMAIL, "payload.template", "t" * 201),
        (EMAIL, "payload.template", "../secrets"),
        (EMAIL, "payload.attachments", [{"filename": "a", "path": "a"}] * 51),
        (EMAIL, "payload.attachments", [{"filename": "a" * 256, "path": "a"}]),
        (EMAIL, "payload.attachments", [{"filename": "", "path": "a"}]),
        (SHEETS, "payload.spreadsheetId", "s" * 201),
        (SHEETS, "payload.spreadsheetId", "../sheet"),
        (SHEETS, "payload.range", "r" * 501),
        (SHEETS, "payload.values", [["v"]] * 10_001),
        (SHEETS, "payload.values", [["v"] * 1001]),
        (SHEETS, "payload.auth.access_token", "t" * 8193),
        (SHEETS, "payload.auth.refresh_token", ""),
    ],
)
def test_values_beyond_the_limits_are_invalid(
    message: dict[str, Any], path: str, value: Any
) -> None:
    """Strings, lists and maps beyond their bounds are JobInvalid; the reason names the field."""
    reason = assert_invalid(changed(message, path, value))
    assert "$." in reason


def test_reason_does_not_echo_the_secret() -> None:
    """The validation reason for an oversized secret does not contain the secret."""
    secret = "whsec_" + "k" * 5000
    reason = assert_invalid(changed(WEBHOOK, "payload.secret", secret))
    assert "kkkk" not in reason


def test_a_list_of_secrets_decodes_in_order() -> None:
    """payload.secret may be a list of secrets (rotation), kept in the order given."""
    secrets = ["whsec_bmV3LXNlY3JldA==", "whsk_" + "A" * 43 + "=", "plain-old-secret"]
    job = jobs.decode(changed(WEBHOOK, "payload.secret", secrets))
    assert isinstance(job, WebhookJob) and job.payload.secret == secrets


@pytest.mark.parametrize(
    "secrets",
    [[], ["s"] * (jobs.MAX_SECRETS + 1), ["whsec_ok", ""], ["whsec_ok", 7], ["x" * 4097]],
    ids=["empty", "too-many", "empty-item", "not-a-string", "too-long"],
)
def test_a_bad_list_of_secrets_is_invalid(secrets: list[Any]) -> None:
    """An empty list, more than MAX_SECRETS, or an item that is not a short non-empty string."""
    reason = assert_invalid(changed(WEBHOOK, "payload.secret", secrets))
    assert "$.payload.secret" in reason and "xxxx" not in reason


def test_the_schema_documents_secret_as_a_string_or_a_list() -> None:
    """`formcraftd schema webhook` shows both forms of payload.secret and their bounds."""
    secret = jobs.schema("webhook")["$defs"]["WebhookPayload"]["properties"]["secret"]
    string, array = secret["anyOf"]
    assert string["type"] == "string" and array["type"] == "array"
    assert (array["minItems"], array["maxItems"]) == (1, jobs.MAX_SECRETS)
    assert "whsk_" in secret["description"]


def test_job_invalid_is_a_formcraft_error() -> None:
    """JobInvalid belongs to the one exception tree."""
    assert issubclass(JobInvalid, FormcraftError)


def _nested(depth: int) -> Any:
    """A list nested `depth` levels deep."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("message", "path"),
    [(WEBHOOK, "payload.body"), (EMAIL, "payload.data.deep"), (SHEETS, "payload.values")],
)
def test_deep_nesting_does_not_crash_decode(message: dict[str, Any], path: str) -> None:
    """A hostile, deeply nested body is JobInvalid (or decodes), never a RecursionError."""
    depth = 20_000
    body = changed(message, path, "@NESTED@").replace(b'"@NESTED@"', b"[" * depth + b"]" * depth)
    assert len(body) < 1_048_576  # within the default max_message_bytes
    with contextlib.suppress(JobInvalid):
        jobs.decode(body)


def test_moderate_nesting_decodes() -> None:
    """A reasonably nested body (50 levels) is accepted as is."""
    job = jobs.decode(changed(WEBHOOK, "payload.body", _nested(50)))
    assert isinstance(job, WebhookJob)


# --- job ids and schemas -----------------------------------------------------------------


def test_job_id_is_the_message_id_when_set() -> None:
    """The publisher's AMQP message_id is the job id."""
    assert jobs.job_id_for("msg-42", body_of(WEBHOOK)) == "msg-42"


@pytest.mark.parametrize("message_id", [None, ""])
def test_job_id_without_message_id_is_a_stable_hash(message_id: str | None) -> None:
    """Without a message_id the id is derived from the body: stable, and different per body."""
    first = jobs.job_id_for(message_id, body_of(WEBHOOK))
    assert first == jobs.job_id_for(None, body_of(WEBHOOK))
    assert first != jobs.job_id_for(None, body_of(EMAIL))
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 32


@pytest.mark.parametrize(
    ("kind", "tag"),
    [("webhook", "webhook.send"), ("email", "email.send"), ("sheets", "sheets.update")],
)
def test_schema_of_each_kind_has_the_type_discriminator(kind: str, tag: str) -> None:
    """schema(kind) is a JSON Schema whose job object requires `type` fixed to the tag."""
    schema = jobs.schema(kind)
    orjson.dumps(schema)  # plain JSON data
    name = {"webhook": "WebhookJob", "email": "EmailJob", "sheets": "SheetsJob"}[kind]
    assert schema["$ref"] == f"#/$defs/{name}"
    job = schema["$defs"][name]
    assert job["type"] == "object"
    assert job["properties"]["type"] == {"enum": [tag]}
    assert {"type", "payload", "metadata"} <= set(job["required"])


def test_schema_of_the_union_maps_every_tag() -> None:
    """schema() with no kind is the union, discriminated on `type`, of all three jobs."""
    schema = jobs.schema()
    orjson.dumps(schema)
    assert len(schema["anyOf"]) == 3
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(schema["discriminator"]["mapping"]) == {
        "webhook.send",
        "email.send",
        "sheets.update",
    }
    for ref in schema["discriminator"]["mapping"].values():
        assert ref.removeprefix("#/$defs/") in schema["$defs"]


def test_schema_uses_the_wire_names() -> None:
    """The schema names fields as the wire does (camelCase metadata, spreadsheetId)."""
    defs = jobs.schema()["$defs"]
    assert "formId" in defs["Metadata"]["properties"]
    assert "spreadsheetId" in defs["SheetsPayload"]["properties"]


def test_a_delivered_snippet_is_made_once_and_only_when_read() -> None:
    calls: list[int] = []

    def describe() -> str:
        calls.append(1)
        return "ok"

    delivered = Delivered(200, describe=describe)
    assert calls == []  # nothing read it yet
    assert delivered.snippet == "ok"
    assert delivered.snippet == "ok"
    assert calls == [1]
    assert Delivered(204, "given").snippet == "given"
    assert "ok" not in repr(delivered)
