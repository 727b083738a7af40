#!/usr/bin/env bash
# Install, upgrade, roll back or uninstall formcraftd as a systemd service, from
# the lock files in requirements/. Run as root from a checkout; `--help` says how.
set -euo pipefail
shopt -s nullglob inherit_errexit

usage() {
	cat <<'EOF'
Usage: contrib/install.sh [install|upgrade|rollback|uninstall] [options]   (as root)

  install     Build a wheel of this checkout and install it, with exactly the
  (upgrade)   versions and hashes of requirements/runtime.txt (pip --require-hashes),
              in a new virtualenv PREFIX/releases/<version>-<UTC time>/. Create
              the service user and group (system, no login, home STATEDIR) when
              missing, CONFDIR (root:USER 0750) with config.toml and env
              (root:USER 0640; installed only when missing), STATEDIR (USER 0750)
              and the unit. Then check the config with the new release
              (`formcraftd check-config`; when it is refused nothing is switched),
              point PREFIX/current at the new release and PREFIX/previous at the
              one it replaces (older releases are removed), and restart the
              service if it runs. Re-running it upgrades in place: an existing
              config.toml and env are kept (their owner and mode are set as
              above); the shipped config.toml goes beside it as config.toml.new
              when they differ.
  rollback    Point PREFIX/current back at PREFIX/previous (and previous at the
              release it replaced, so a second rollback undoes the first) when
              that release accepts the config, put its unit back and restart
              the service if it runs. The next install replaces the release
              rolled back from.
  uninstall   Stop and disable the service, remove the unit and PREFIX. The
              config, the state and the user stay; --purge removes CONFDIR and
              STATEDIR too (the user stays, files elsewhere may be its own:
              `userdel formcraftd` removes it).

Options (defaults in brackets):
  --destdir DIR     install under DIR instead of / (env DESTDIR) [empty]. The
                    unit still names the real paths, the virtualenv is built at
                    its place inside DIR (its scripts run from there: for tests
                    and inspection, not for copying elsewhere), the user is
                    created on this system and systemctl is not called.
  --prefix DIR      where the releases live [/opt/formcraftd]
  --confdir DIR     the config folder [/etc/formcraftd]
  --statedir DIR    the state folder, under /var/lib (the unit's StateDirectory=;
                    systemd passes it to the daemon as STATE_DIRECTORY, which
                    sets workers.email.state_dir) [/var/lib/formcraftd]
  --unitdir DIR     where formcraftd.service goes [/etc/systemd/system]
  --user NAME       the service user and group [formcraftd]
  --python PATH     the Python of the virtualenv: 3.11 or newer, with venv, and
                    outside /root and /home (the unit has ProtectHome=yes) [python3]
  --purge           uninstall: remove the config and the state too
  -h, --help        this text

Needs: Python 3.11 or newer with its venv module (Debian 12, Ubuntu 24.04:
`apt install python3-venv`; where python3 is older, install a newer Python
with its venv module and pass --python), and pip's access to the package index
(or to a mirror in /etc/pip.conf).

Examples:
  sudo make install                       # or: sudo contrib/install.sh install
  sudoedit /etc/formcraftd/config.toml /etc/formcraftd/env
  sudo systemctl enable --now formcraftd
  git pull && sudo make install           # upgrade; the config stays
  sudo make rollback                      # back to the previous release
  sudo make uninstall                     # PURGE=1: config and state too
  sudo make install INSTALL_ARGS="--python /usr/bin/python3.12"
EOF
}

die() {
	echo "install.sh: $*" >&2
	exit 1
}

say() {
	echo "install.sh: $*"
}

ACTION=install
DESTDIR=${DESTDIR:-}
PREFIX=/opt/formcraftd
CONFDIR=/etc/formcraftd
STATEDIR=/var/lib/formcraftd
UNITDIR=/etc/systemd/system
SERVICE_USER=formcraftd
PYTHON=python3
PURGE=no
UNIT=formcraftd.service
# The template for several daemons on one VM (formcraftd@9801, ...; docs/scaling.md).
TEMPLATE=formcraftd@.service
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

parse_args() {
	while (($#)); do
		case $1 in
		install | upgrade) ACTION=install ;;
		rollback | uninstall) ACTION=$1 ;;
		--destdir) DESTDIR=${2?--destdir needs a value}; shift ;;
		--prefix) PREFIX=${2?--prefix needs a value}; shift ;;
		--confdir) CONFDIR=${2?--confdir needs a value}; shift ;;
		--statedir) STATEDIR=${2?--statedir needs a value}; shift ;;
		--unitdir) UNITDIR=${2?--unitdir needs a value}; shift ;;
		--user) SERVICE_USER=${2?--user needs a value}; shift ;;
		--python) PYTHON=${2?--python needs a value}; shift ;;
		--purge) PURGE=yes ;;
		-h | --help) usage; exit 0 ;;
		*) usage >&2; exit 2 ;;
		esac
		shift
	done
	local dir
	for dir in "$PREFIX" "$CONFDIR" "$STATEDIR" "$UNITDIR"; do
		[[ $dir == /?* ]] || die "$dir: expected an absolute path"
	done
	[[ $STATEDIR == /var/lib/?* ]] ||
		die "--statedir $STATEDIR: must be under /var/lib (the unit's StateDirectory=)"
	[[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user $SERVICE_USER: not a user name"
	DESTDIR=${DESTDIR%/}
	[[ -z $DESTDIR || $DESTDIR == /* ]] || DESTDIR=$PWD/$DESTDIR
	ROOT_PREFIX=$DESTDIR$PREFIX
}

# systemctl only for a real install on a system that runs systemd.
have_systemd() {
	[[ -z $DESTDIR && -d /run/systemd/system ]] && command -v systemctl >/dev/null
}

restart_if_active() {
	if have_systemd && systemctl is-active --quiet "$UNIT"; then
		say "restarting $UNIT"
		systemctl restart "$UNIT"
	fi
	if have_systemd; then # running instances of the template, if any
		systemctl try-restart 'formcraftd@*.service'
	fi
}

check_python() {
	command -v "$PYTHON" >/dev/null || die "$PYTHON: not found (Python 3.11 or newer is needed)"
	"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "$PYTHON is $("$PYTHON" --version 2>&1); formcraftd needs Python 3.11 or newer"
	"$PYTHON" -m ensurepip --version >/dev/null 2>&1 ||
		die "$PYTHON has no venv/ensurepip module (Debian/Ubuntu: apt install python3-venv)"
	# The unit has ProtectHome=yes: a Python under /root or /home (pyenv, ...) is
	# invisible to the service.
	local base
	base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
	case $base in
	/root | /root/* | /home/*)
		echo "install.sh: warning: $PYTHON lives in $base, which the service cannot see" \
			"(ProtectHome=yes); use --python /usr/bin/python3" >&2 ;;
	esac
}

ensure_user() {
	if ! getent group "$SERVICE_USER" >/dev/null; then
		say "creating the system group $SERVICE_USER"
		groupadd --system "$SERVICE_USER"
	fi
	if ! getent passwd "$SERVICE_USER" >/dev/null; then
		say "creating the system user $SERVICE_USER (home $STATEDIR, no login)"
		useradd --system --gid "$SERVICE_USER" --home-dir "$STATEDIR" --no-create-home \
			--shell "$(command -v nologin || echo /usr/sbin/nologin)" "$SERVICE_USER"
	fi
}

# pip with the lock-file discipline of the Makefile: exact versions, every hash.
pip_locked() {
	"$1" -m pip --disable-pip-version-check install --no-input --require-hashes "${@:2}"
}

# Builds the wheel from a copy of the sources, so the checkout gets no root-owned
# build/ or *.egg-info; prints the wheel's path.
build_wheel() {
	local work=$1
	mkdir -p "$work/src" "$work/dist"
	cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/formcraftd" "$work/src/"
	find "$work/src" -name __pycache__ -type d -prune -exec rm -rf {} +
	"$PYTHON" -m venv "$work/build-venv"
	pip_locked "$work/build-venv/bin/python" --quiet -r "$SRC/requirements/build.txt" >&2
	"$work/build-venv/bin/python" -m pip --disable-pip-version-check wheel --quiet --no-input \
		--no-deps --no-build-isolation --wheel-dir "$work/dist" "$work/src" >&2
	local wheels=("$work"/dist/formcraftd-*.whl)
	((${#wheels[@]} == 1)) || die "expected one formcraftd wheel in $work/dist"
	echo "${wheels[0]}"
}

# The shipped unit with this install's paths and user.
render_unit() {
	local unit=$1
	sed -e "s|/opt/formcraftd|$PREFIX|g" \
		-e "s|/etc/formcraftd|$CONFDIR|g" \
		-e "s|/var/lib/formcraftd|$STATEDIR|g" \
		-e "s|^StateDirectory=.*|StateDirectory=${STATEDIR#/var/lib/}|" \
		-e "s|^User=.*|User=$SERVICE_USER|" \
		-e "s|^Group=.*|Group=$SERVICE_USER|" \
		"$SRC/systemd/$unit"
}

# Points the symlink $1 at $2 (relative, so it holds inside DESTDIR too) in one rename.
switch_link() {
	ln -sfn "$2" "$1.new"
	mv -T "$1.new" "$1"
}

install_unit_of() {
	local release=$1
	local unit
	for unit in "$UNIT" "$TEMPLATE"; do
		# A release from before the template has only the plain unit.
		[[ -f $ROOT_PREFIX/$release/share/formcraftd/$unit ]] || continue
		install -D -m 0644 "$ROOT_PREFIX/$release/share/formcraftd/$unit" "$DESTDIR$UNITDIR/$unit"
	done
	if have_systemd; then
		systemctl daemon-reload
	fi
}

# The shipped config with state_dir set to STATEDIR: the daemon gets the same
# folder from the unit (STATE_DIRECTORY), and `formcraftd suppression ...` run
# from a shell finds the service's list too.
render_config() {
	sed -e "s|^state_dir = \"\./var\" *#|state_dir = \"$STATEDIR\"  #|" "$SRC/config.toml"
}

install_config() {
	local conf=$DESTDIR$CONFDIR shipped=$WORK/config.toml
	render_config >"$shipped"
	install -d -m 0750 -o root -g "$SERVICE_USER" "$conf"
	if [[ -e $conf/config.toml ]]; then
		if cmp -s "$shipped" "$conf/config.toml"; then
			rm -f "$conf/config.toml.new"
		else
			install -m 0640 -o root -g "$SERVICE_USER" "$shipped" "$conf/config.toml.new"
			say "kept $CONFDIR/config.toml; the shipped one is $CONFDIR/config.toml.new"
		fi
	else
		install -m 0640 -o root -g "$SERVICE_USER" "$shipped" "$conf/config.toml"
		say "installed $CONFDIR/config.toml (edit it, then: formcraftd check-config)"
	fi
	if [[ ! -e $conf/env ]]; then
		install -m 0640 -o root -g "$SERVICE_USER" /dev/null "$conf/env"
		cat >"$conf/env" <<'EOF'
# Secrets for formcraftd.service (KEY=value lines), kept out of config.toml:
# RABBITMQ_URL=amqp://user:password@host:5672/
# FORMCRAFTD_ADMIN_TOKEN=
# SMTP_PASSWORD=
# GOOGLE_CLIENT_SECRET=
# SENTRY_DSN=
EOF
	fi
	# Readable by the service, not by others, whoever created the files.
	local file
	for file in "$conf/config.toml" "$conf/env"; do
		chown root:"$SERVICE_USER" "$file"
		chmod 0640 "$file"
	done
}

# A config that a release refuses would stop the service at its restart (exit 1,
# which the unit does not restart): check it before switching to that release,
# in the environment the unit gives (the secrets of env are not read here).
config_accepted_by() {
	env -i PATH=/usr/bin:/bin STATE_DIRECTORY="$STATEDIR" \
		"$ROOT_PREFIX/$1/bin/formcraftd" check-config --config "$DESTDIR$CONFDIR/config.toml" \
		>/dev/null
}

WORK=
TARGET=
# The build folder goes, and so does a release whose install did not complete.
cleanup() {
	if [[ -n $WORK ]]; then
		rm -rf "$WORK"
	fi
	if [[ -n $TARGET && ! -e $TARGET/.complete ]]; then
		rm -rf "$TARGET"
	fi
}

do_install() {
	[[ -f $SRC/requirements/runtime.txt && -f $SRC/systemd/$UNIT ]] ||
		die "$SRC: not a formcraftd checkout"
	check_python
	ensure_user
	umask 022

	WORK=$(mktemp -d)
	trap cleanup EXIT
	say "building the wheel"
	local wheel version release target
	wheel=$(build_wheel "$WORK")
	version=$(basename "$wheel" | cut -d- -f2)
	release=$version-$(date -u +%Y%m%dT%H%M%SZ)
	target=$ROOT_PREFIX/releases/$release
	[[ ! -e $target ]] || die "$target already exists"

	say "installing release $release in $PREFIX/releases/ from requirements/runtime.txt"
	mkdir -p "$ROOT_PREFIX/releases"
	TARGET=$target
	"$PYTHON" -m venv "$target"
	pip_locked "$target/bin/python" --quiet -r "$SRC/requirements/runtime.txt"
	"$target/bin/python" -m pip --disable-pip-version-check install --quiet --no-input \
		--no-deps "$wheel"
	"$target/bin/python" -m pip --disable-pip-version-check check >/dev/null
	"$target/bin/formcraftd" --version >/dev/null
	install -D -m 0644 "$SRC/README.md" "$target/share/doc/formcraftd/README.md"
	install -D -m 0644 "$SRC/config.toml" "$target/share/doc/formcraftd/config.toml"
	local unit
	for unit in "$UNIT" "$TEMPLATE"; do
		render_unit "$unit" >"$WORK/$unit"
		install -D -m 0644 "$WORK/$unit" "$target/share/formcraftd/$unit"
	done
	touch "$target/.complete"

	install_config
	install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DESTDIR$STATEDIR"

	if ! config_accepted_by "releases/$release"; then
		rm -f "$target/.complete"
		die "release $release refuses $CONFDIR/config.toml (see above); nothing switched"
	fi

	local current
	current=$(readlink "$ROOT_PREFIX/current" || true)
	if [[ -n $current && $current != "releases/$release" ]]; then
		switch_link "$ROOT_PREFIX/previous" "$current"
	fi
	switch_link "$ROOT_PREFIX/current" "releases/$release"
	install_unit_of "releases/$release"
	prune_releases
	say "current: $release${current:+ (previous: ${current#releases/})}"
	restart_if_active
	if have_systemd && ! systemctl is-enabled --quiet "$UNIT"; then
		say "start it with: systemctl enable --now formcraftd"
	fi
}

# Keeps the releases that current and previous point at; removes the others.
prune_releases() {
	local keep_current keep_previous dir
	keep_current=$(readlink "$ROOT_PREFIX/current" || true)
	keep_previous=$(readlink "$ROOT_PREFIX/previous" || true)
	for dir in "$ROOT_PREFIX"/releases/*/; do
		dir=releases/$(basename "$dir")
		if [[ $dir != "$keep_current" && $dir != "$keep_previous" ]]; then
			say "removing the old release ${dir#releases/}"
			rm -rf "${ROOT_PREFIX:?}/$dir"
		fi
	done
}

do_rollback() {
	local current previous
	current=$(readlink "$ROOT_PREFIX/current" || true)
	previous=$(readlink "$ROOT_PREFIX/previous" || true)
	[[ -n $previous && -e $ROOT_PREFIX/$previous/.complete ]] ||
		die "no previous release to roll back to in $PREFIX"
	config_accepted_by "$previous" ||
		die "release ${previous#releases/} refuses $CONFDIR/config.toml (see above); nothing switched"
	switch_link "$ROOT_PREFIX/current" "$previous"
	if [[ -n $current ]]; then
		switch_link "$ROOT_PREFIX/previous" "$current"
	fi
	install_unit_of "$previous"
	say "current: ${previous#releases/} (previous: ${current#releases/})"
	restart_if_active
}

do_uninstall() {
	if have_systemd; then
		systemctl disable --now "$UNIT" 'formcraftd@*.service' 2>/dev/null || true
	fi
	rm -f "$DESTDIR$UNITDIR/$UNIT" "$DESTDIR$UNITDIR/$TEMPLATE"
	if have_systemd; then
		systemctl daemon-reload
	fi
	say "removing $PREFIX"
	rm -rf "${ROOT_PREFIX:?}"
	if [[ $PURGE == yes ]]; then
		say "removing $CONFDIR and $STATEDIR"
		rm -rf "${DESTDIR}${CONFDIR:?}" "${DESTDIR}${STATEDIR:?}"
	else
		say "kept $CONFDIR and $STATEDIR (--purge removes them)"
	fi
	say "the user $SERVICE_USER stays (userdel $SERVICE_USER removes it)"
}

main() {
	parse_args "$@"
	[[ $(id -u) == 0 ]] || die "run it as root (sudo)"
	# One install.sh at a time on a prefix: two would race on the symlinks.
	mkdir -p "$ROOT_PREFIX"
	exec 9>"$ROOT_PREFIX/.lock"
	flock --nonblock 9 || die "another install.sh is running on $PREFIX"
	case $ACTION in
	install) do_install ;;
	rollback) do_rollback ;;
	uninstall) do_uninstall ;;
	esac
}

main "$@"
