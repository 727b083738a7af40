"""A real IMAP server for the bounce-mailbox tests: Dovecot, started by the test.

Debian's `dovecot-imapd` (`make test` installs it), run in the foreground
(`dovecot -F`) with a throwaway configuration in the test's temporary folder:
passwd-file authentication, a Maildir, plain IMAP on a free loopback port.
Messages are put in with IMAP APPEND; what the daemon did to them is read
back from the Maildir on disk (folder, flags).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aioimaplib
import pytest

from tests.support.process import free_port

USER = "bounces"
PASSWORD = "imap-test-password-123"
DOVECOT_PATHS = ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot")


def dovecot_binary() -> str:
    """The dovecot binary; the test fails (never skips) when it is missing."""
    found = shutil.which("dovecot") or next(
        (path for path in DOVECOT_PATHS if os.access(path, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "dovecot is not installed: the bounce mailbox tests need Debian's `dovecot-imapd` "
            "(sudo apt-get install dovecot-imapd; `make test` run as root installs it)"
        )
    return found


def _service_users() -> tuple[str, str, int, int]:
    """(internal user, login user, mail uid, mail gid) for Dovecot's processes.

    As root, the users the Debian package made and Debian's `mail` user for the
    mailbox (Dovecot never accesses mail as root); else the current user for all.
    """
    if os.getuid() == 0:
        for name in ("dovecot", "dovenull"):
            pwd.getpwnam(name)
        mail = pwd.getpwnam("mail")
        return "dovecot", "dovenull", mail.pw_uid, mail.pw_gid
    me = getpass.getuser()
    return me, me, os.getuid(), os.getgid()


CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal}
default_login_user = {login}
default_internal_group = {group}
first_valid_uid = 0
mail_location = maildir:{root}/mail/%u/Maildir
mail_plugins =
# IDLE notices new mail through inotify; a message that lands while IDLE is being set
# up is otherwise only seen at the next check (30 s by default).
mailbox_idle_check_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = 20
}}
{extra}
"""


@dataclass
class Dovecot:
    """One running Dovecot and its Maildir."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / USER / "Maildir"

    def folder(self, name: str) -> Path:
        return self.maildir if name == "INBOX" else self.maildir / f".{name}"

    def messages(self, folder: str = "INBOX") -> list[tuple[bytes, str]]:
        """(message, Maildir flags) of each message in `folder`, by file name."""
        found = []
        base = self.folder(folder)
        for sub in ("new", "cur"):
            for path in sorted((base / sub).glob("*")) if (base / sub).is_dir() else []:
                _, _, flags = path.name.partition(":2,")
                found.append((path.read_bytes(), flags))
        return found

    def keywords(self, folder: str) -> dict[str, str]:
        """Maildir keyword letter -> keyword name, from Dovecot's dovecot-keywords file."""
        path = self.folder(folder) / "dovecot-keywords"
        if not path.exists():
            return {}
        pairs = (line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
        return {chr(ord("a") + int(number)): name for number, name in pairs}

    async def append(self, message: bytes, folder: str = "INBOX") -> None:
        """Deliver `message` into `folder` with IMAP APPEND."""
        client = aioimaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        await client.wait_hello_from_server()
        assert (await client.login(USER, PASSWORD)).result == "OK"
        crlf = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        response = await client.append(crlf, mailbox=folder)
        assert response.result == "OK", response
        await client.logout()

    async def stop(self) -> None:
        """Stop it, and wait until its port refuses connections (its login processes,
        which outlive the master for a moment, are gone too)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)
            except TimeoutError:
                self.process.kill()
                self.process.wait()
        async with asyncio.timeout(15):
            while await self._answers():  # noqa: ASYNC110 - a port has no event to wait on
                await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    def spawn(self) -> None:
        """Start `dovecot -F` (in the foreground: a child of the tests, not a daemon)."""
        with (self.root / "dovecot.out").open("ab") as out:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [dovecot_binary(), "-F", "-c", str(self.root / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> None:
        """Start it (again, on the same port and Maildir) and wait until it answers."""
        self.spawn()
        assert self.process is not None
        async with asyncio.timeout(15):
            while True:
                if self.process.poll() is not None:
                    said = [self.root / "dovecot.out", self.root / "dovecot.log"]
                    detail = "".join(p.read_text()[-2000:] for p in said if p.exists())
                    raise AssertionError(f"dovecot exited: {detail}")
                if await self._answers():
                    return
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_dovecot(root: Path, *, idle: bool = True) -> AsyncIterator[Dovecot]:
    """A Dovecot on a free loopback port with one user, stopped afterwards.

    With `idle=False` the server offers neither IDLE nor MOVE (the poller is used).
    """
    server = _configure(root, idle=idle)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _configure(root: Path, *, idle: bool) -> Dovecot:
    """Write the throwaway configuration, the passwd file and the folders under `root`."""
    internal, login, uid, gid = _service_users()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir(exist_ok=True)
    os.chown(root / "mail", uid, gid)
    (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    server = Dovecot(root, free_port())
    # Without IDLE, also without MOVE: the reader must then copy, flag it deleted, UID EXPUNGE.
    extra = "" if idle else "imap_capability = IMAP4rev1 LITERAL+ UIDPLUS\n"
    (root / "dovecot.conf").write_text(
        CONFIG.format(
            root=root,
            port=server.port,
            internal=internal,
            login=login,
            group=grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name,
            uid=uid,
            gid=gid,
            extra=extra,
        )
    )
    if os.getuid() == 0:  # Dovecot's own processes must reach their folders
        for folder in (root, *root.parents):
            if folder == Path("/"):
                break
            os.chmod(folder, os.stat(folder).st_mode | 0o711)
    return server
