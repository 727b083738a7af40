"""Bounces and complaints: DSN and ARF parsing, the bounce mailbox, the suppression policy.

- :mod:`.dsn`, :mod:`.arf`: delivery status notifications (RFC 3464) and
  feedback reports (RFC 5965), parsed with the stdlib `email` package;
- :mod:`.ledger`: the jobs sent lately, so a bounce can name its job;
- :mod:`.policy`: what a bounce or a complaint does to the suppression list;
- :mod:`.mailbox`: the IMAP reader of the bounce mailbox.
"""

from formcraftd.workers.email.bounces.ledger import BounceLedger
from formcraftd.workers.email.bounces.policy import BouncePolicy

__all__ = ["BounceLedger", "BouncePolicy"]
