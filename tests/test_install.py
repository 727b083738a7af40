"""contrib/install.sh in a scratch root: install, upgrade, rollback, uninstall.

The module installs twice (the second run is an upgrade over an edited config)
into a fresh DESTDIR, with a service user of its own that it deletes at the end;
the tests then look at the result, as that user where it matters. Needs root,
useradd and setpriv; about a minute (two wheels, two virtualenvs from the lock).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "contrib" / "install.sh"
# An unrelated unprivileged user (nobody), by number: its names differ between systems.
AS_NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
EDIT = "\n# edited by the operator\n"

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Installed:
    """A scratch install: its root, its service user and the two releases it made."""

    root: Path
    user: str
    python: str
    first: str
    second: str

    @property
    def prefix(self) -> Path:
        return self.root / "opt" / "formcraftd"

    @property
    def confdir(self) -> Path:
        return self.root / "etc" / "formcraftd"

    @property
    def statedir(self) -> Path:
        return self.root / "var" / "lib" / "formcraftd"

    @property
    def unit(self) -> Path:
        return self.root / "etc" / "systemd" / "system" / "formcraftd.service"

    def current(self) -> str:
        return os.readlink(self.prefix / "current")

    def attempt(self, *args: str) -> subprocess.CompletedProcess[str]:
        """contrib/install.sh with this root and user, whatever its exit status."""
        return subprocess.run(
            [str(INSTALL_SH), *args, "--destdir", str(self.root), "--user", self.user],
            capture_output=True,
            text=True,
            check=False,
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """contrib/install.sh with this root and user; fails the test on a non-zero exit."""
        result = self.attempt(*args)
        assert result.returncode == 0, f"install.sh {' '.join(args)}:\n{result.stderr[-3000:]}"
        return result

    def as_service(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `argv` as the service user, with the environment systemd would give it."""
        return subprocess.run(
            ["setpriv", "--reuid", self.user, "--regid", self.user, "--clear-groups", *argv],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": str(self.statedir)},
            cwd="/",
            check=False,
        )


def _usable_python(root: Path) -> str | None:
    """A Python >= 3.11 with venv that an unprivileged user can run and that can reach `root`."""
    candidates = ["/usr/bin/python3", shutil.which("python3"), os.path.realpath(sys.executable)]
    probe = "import os, sys; sys.exit(sys.version_info < (3, 11) or not os.access(sys.argv[1], 1))"
    for python in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        ensurepip = subprocess.run(
            [python, "-m", "ensurepip", "--version"], capture_output=True, check=False
        )
        as_nobody = subprocess.run(
            [*AS_NOBODY, python, "-c", probe, str(root)], capture_output=True, check=False
        )
        if ensurepip.returncode == 0 and as_nobody.returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """Install, edit the config, install again (an upgrade); remove the user and root after."""
    if os.geteuid() != 0:
        pytest.skip("the service install needs root (it creates a user and chowns files)")
    for tool in ("useradd", "userdel", "setpriv", "install"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    root = Path(tempfile.mkdtemp(prefix="formcraftd-install-"))
    root.chmod(0o755)  # the service user must reach the files below it
    user = f"fcdtest{secrets.token_hex(4)}"
    try:
        python = _usable_python(root)
        if python is None:
            pytest.skip("no Python >= 3.11 with venv that an unprivileged user can run")
        base = Installed(root, user, python, "", "")
        base.run("install", "--python", python)
        first = base.current()
        with (base.confdir / "config.toml").open("a", encoding="utf-8") as config_file:
            config_file.write(EDIT)
        base.run("install", "--python", python)
        yield Installed(root, user, python, first, base.current())
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", user], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_config_is_readable_by_the_service_and_not_by_others(installed: Installed) -> None:
    """config.toml and env are root:<service group> 0640 in a 0750 folder."""
    group = installed.user
    for path, mode in (
        (installed.confdir, 0o750),
        (installed.confdir / "config.toml", 0o640),
        (installed.confdir / "env", 0o640),
    ):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == mode, path
        assert info.st_uid == 0, path
        assert _group_name(info.st_gid) == group, path


def test_check_config_reads_the_installed_config_as_the_service_user(
    installed: Installed,
) -> None:
    """`formcraftd check-config` as the service user exits 0; state_dir is the state folder."""
    binary = installed.prefix / "current" / "bin" / "formcraftd"
    config_path = installed.confdir / "config.toml"
    result = installed.as_service(str(binary), "check-config", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    effective = orjson.loads(result.stdout)
    assert effective["workers"]["email"]["state_dir"] == str(installed.statedir)


def test_state_dir_is_writable_by_the_service_user(installed: Installed) -> None:
    """The service user owns the state folder (0750) and can create files in it."""
    info = installed.statedir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o750
    assert _user_name(info.st_uid) == installed.user
    probe = installed.statedir / "probe"
    result = installed.as_service("/usr/bin/touch", str(probe))
    assert result.returncode == 0, result.stderr
    probe.unlink()


def test_the_config_is_not_readable_by_others(installed: Installed) -> None:
    """An unrelated unprivileged user cannot read config.toml."""
    result = subprocess.run(
        [*AS_NOBODY, "/bin/cat", str(installed.confdir / "config.toml")],
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0


def test_upgrade_keeps_the_edited_config_and_ships_the_new_one_beside_it(
    installed: Installed,
) -> None:
    """The second install keeps config.toml as edited; the shipped one (state_dir set) is .new."""
    assert (installed.confdir / "config.toml").read_text(encoding="utf-8").endswith(EDIT)
    shipped = (REPO / "config.toml").read_text(encoding="utf-8")
    new = (installed.confdir / "config.toml.new").read_text(encoding="utf-8")
    rendered = re.sub(
        r'^state_dir = "\./var" *#', 'state_dir = "/var/lib/formcraftd"  #', shipped, flags=re.M
    )
    assert rendered != shipped
    assert new == rendered


def test_installed_config_names_the_state_folder_for_commands_run_from_a_shell(
    installed: Installed,
) -> None:
    """Without STATE_DIRECTORY (an operator's shell), state_dir is still /var/lib/formcraftd."""
    result = subprocess.run(
        [
            str(installed.prefix / "current" / "bin" / "formcraftd"),
            "check-config",
            "--config",
            str(installed.confdir / "config.toml"),
        ],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["workers"]["email"]["state_dir"] == "/var/lib/formcraftd"


def test_upgrade_switches_current_and_keeps_the_previous_release(installed: Installed) -> None:
    """current points at the new release, previous at the one it replaced."""
    assert installed.first != installed.second
    assert installed.current() == installed.second
    assert os.readlink(installed.prefix / "previous") == installed.first
    releases = sorted(path.name for path in (installed.prefix / "releases").iterdir())
    assert releases == sorted(Path(r).name for r in (installed.first, installed.second))


def test_unit_runs_the_current_release_as_the_service_user(installed: Installed) -> None:
    """The installed unit names the real paths (not DESTDIR's), the user and the state folder."""
    text = installed.unit.read_text(encoding="utf-8")
    assert (
        "ExecStart=/opt/formcraftd/current/bin/formcraftd run"
        " --config /etc/formcraftd/config.toml\n" in text
    )
    assert f"\nUser={installed.user}\n" in text
    assert "\nStateDirectory=formcraftd\n" in text
    assert str(installed.root) not in text
    documentation = text.split("Documentation=file://", 1)[1].split("\n", 1)[0]
    assert (installed.root / documentation.lstrip("/")).is_file()


@pytest.mark.parametrize(
    ("installed_name", "verified_name"),
    [
        ("formcraftd.service", "formcraftd.service"),
        ("formcraftd@.service", "formcraftd@9801.service"),
    ],
)
def test_installed_units_pass_systemd_analyze_verify(
    installed: Installed, tmp_path: Path, installed_name: str, verified_name: str
) -> None:
    """`systemd-analyze verify` accepts the unit and an instance of the template, with
    ExecStart pointed into the scratch root."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists; the binary lives under the scratch root here.
    text = (installed.unit.parent / installed_name).read_text(encoding="utf-8")
    text = text.replace("ExecStart=/opt/", f"ExecStart={installed.root}/opt/")
    unit = tmp_path / verified_name
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "formcraftd" not in result.stderr, result.stderr


def test_rollback_switches_current_back_and_a_second_rollback_undoes_it(
    installed: Installed,
) -> None:
    """rollback swaps current and previous; running it again restores the upgrade."""
    installed.run("rollback")
    assert installed.current() == installed.first
    assert os.readlink(installed.prefix / "previous") == installed.second
    installed.run("rollback")
    assert installed.current() == installed.second


def test_install_and_rollback_refused_by_the_kept_config_switch_nothing(
    installed: Installed,
) -> None:
    """A release that rejects the kept config.toml is not switched to, by install or rollback."""
    config_path = installed.confdir / "config.toml"
    kept = config_path.read_bytes()
    releases = sorted((installed.prefix / "releases").iterdir())
    config_path.write_bytes(kept + b"\nno_such_key = 1\n")  # in the last table
    try:
        upgrade = installed.attempt("install", "--python", installed.python)
        rollback = installed.attempt("rollback")
    finally:
        config_path.write_bytes(kept)
    for result in (upgrade, rollback):
        assert result.returncode == 1
        assert "no_such_key" in result.stderr
        assert "nothing switched" in result.stderr
    assert installed.current() == installed.second
    assert os.readlink(installed.prefix / "previous") == installed.first
    assert sorted((installed.prefix / "releases").iterdir()) == releases


# The uninstall tests remove the install, so they run last (pytest keeps file order).


def test_uninstall_removes_the_code_and_keeps_config_and_state(installed: Installed) -> None:
    """uninstall removes the unit and the releases; the config and the state stay."""
    installed.run("uninstall")
    assert not installed.prefix.exists()
    assert not installed.unit.exists()
    assert not (installed.unit.parent / "formcraftd@.service").exists()
    assert (installed.confdir / "config.toml").read_text(encoding="utf-8").endswith(EDIT)
    assert installed.statedir.is_dir()


def test_uninstall_purge_removes_config_and_state(installed: Installed) -> None:
    """uninstall --purge removes the config folder and the state folder too."""
    installed.run("uninstall", "--purge")
    assert not installed.confdir.exists()
    assert not installed.statedir.exists()


def _group_name(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


def _user_name(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name
