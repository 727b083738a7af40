"""The email worker: `email.send` jobs rendered, built and sent over pooled SMTP."""

from formcraftd.workers.email.handler import EmailHandler

__all__ = ["EmailHandler"]
