"""A webhook receiver for the five-minute tour: verifies and prints what it gets.

    python3 contrib/tour/receiver.py [PORT]     # listens on 127.0.0.1:9900 (or PORT)

It checks the Standard Webhooks signature (`webhook-signature`, HMAC-SHA256
over ``id.timestamp.body`` with the secret of contrib/tour/webhook.json) the
way a receiver in the app would, and answers 200, or 401 when it does not
verify. Standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec_dG91ci1zZWNyZXQtZm9yLWZvcm1jcmFmdGQ="  # the secret in webhook.json
ADDRESS = ("127.0.0.1", 9900)


def verified(secret: str, msg_id: str, timestamp: str, body: bytes, header: str) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1)[1] for part in header.split() if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, signature) for signature in offered)


class Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ok = verified(
            SECRET,
            self.headers.get("webhook-id", ""),
            self.headers.get("webhook-timestamp", ""),
            body,
            self.headers.get("webhook-signature", ""),
        )
        print(
            f"{self.command} {self.path} webhook-id={self.headers.get('webhook-id')} "
            f"signature {'verified' if ok else 'WRONG'}: {json.loads(body or b'null')}",
            flush=True,
        )
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: do_POST prints one line per request."""


if __name__ == "__main__":
    host, port = ADDRESS[0], int(sys.argv[1]) if len(sys.argv) > 1 else ADDRESS[1]
    server = ThreadingHTTPServer((host, port), Hook)
    print(f"receiver on http://{host}:{port}/hook", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
