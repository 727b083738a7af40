"""The webhook worker: signed HTTP delivery of `webhook.send` jobs."""

from formcraftd.workers.webhook.handler import WebhookHandler

__all__ = ["WebhookHandler"]
