# formcraftd — set up, run and test. The machine needs python3 (3.11+); run as root
# on Debian, `make run` and `make test` install rabbitmq-server (and, for the tests,
# chromium and dovecot-imapd) with apt-get when missing. Everything else is installed into .venv by
# `make venv`, from the lock files in requirements/ (exact versions, every file's sha256).
#
#   make run                     set up, start RabbitMQ if needed, run the daemon
#   make test                    every test (PYTEST_ARGS="-k breaker -x" to narrow)
#   make test-worker WORKER=email   one worker's tests (webhook | email | sheets)
#   make test-lowest             the tests against the lowest versions pyproject.toml allows
#   make lock | lock-upgrade     recompile requirements/*.txt (keep pins | newest allowed)
#   make bench | lint | clean | distclean
#   make install | rollback | uninstall   as root: the service on this VM (see README)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
CONFIG ?= config.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=
WORKER ?=
AMQP_HOST ?= 127.0.0.1
AMQP_PORT ?= 5672
RABBITMQ_WAIT_S ?= 60

# Lock files. Only pip installs from them, and only with --require-hashes: a file
# whose sha256 is not in the lock, or a dependency the lock forgot, stops the install.
REQ := requirements
PIP := $(BIN)/python -m pip --disable-pip-version-check
PIP_LOCKED := $(PIP) install --require-hashes --no-input

# uv compiles the locks (it is in the dev extra, so the venv has it).
# --universal: one lock valid on every OS and CPU, with environment markers where a
# dependency differs (colorama on Windows, ...) and the hashes of every wheel, so the
# Linux service, CI and a developer's Mac install the same versions from the same
# files. A --python-platform lock would be right for one platform only and silently
# wrong on the others. --python-version 3.11: the oldest Python pyproject.toml allows.
UV ?= $(BIN)/uv
LOCK_ARGS ?=
UV_COMPILE = $(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_ARGS)

# The lowest-versions run (`make test-lowest`) builds its own venv, outside the tree.
LOWEST_VENV ?= /tmp/formcraftd-lowest
LOWEST_TESTS ?= tests

# Exit status 0 when something accepts TCP connections on AMQP_HOST:AMQP_PORT.
AMQP_UP = $(PYTHON) -c 'import socket, sys; s = socket.socket(); s.settimeout(1); \
	sys.exit(s.connect_ex(("$(AMQP_HOST)", $(AMQP_PORT))) != 0)'

.PHONY: venv lock lock-upgrade rabbitmq chromium dovecot run test test-worker test-lowest test-cluster bench lint \
	clean distclean
.DEFAULT_GOAL := test

venv: $(STAMP)

$(BIN)/python:
	@echo "venv: creating $(VENV) with $$($(PYTHON) --version) (pip comes with it)"
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever a lock file it installs from or pyproject.toml (the project's
# own metadata: entry points, package data) is newer than the stamp. Order: the build
# backend, the locked dev environment (runtime + dev + sentry + otel), then the project itself
# with --no-deps --no-build-isolation, so nothing outside the locks is installed.
$(STAMP): $(REQ)/build.txt $(REQ)/dev.txt pyproject.toml | $(BIN)/python
	@echo "venv: installing the build backend from $(REQ)/build.txt"
	$(PIP_LOCKED) -r $(REQ)/build.txt
	@echo "venv: installing the locked dev environment from $(REQ)/dev.txt (runtime + dev + sentry + otel)"
	$(PIP_LOCKED) -r $(REQ)/dev.txt
	@echo "venv: installing formcraftd itself (editable, no dependencies)"
	$(PIP) install --no-deps --no-build-isolation --no-input -e .
	@echo "venv: checking that the locked versions satisfy pyproject.toml (else: make lock)"
	$(PIP) check
	touch $@

# Recompiles every lock from pyproject.toml, keeping the pinned versions that still
# fit (`make lock-upgrade` moves everything to the newest allowed). dev.txt is
# constrained by runtime.txt and bench.txt by dev.txt, so the tests run exactly the
# versions a service install gets and the benchmarks exactly the versions the tests
# ran. build.txt locks the build backend named in [build-system]. With UV=/path/to/uv
# it runs without the venv (the first lock, or a lock too broken to install).
lock: $(if $(filter $(BIN)/uv,$(UV)),venv)
	@echo "lock: $(REQ)/runtime.txt (the runtime dependencies: what a service installs)"
	$(UV_COMPILE) pyproject.toml -o $(REQ)/runtime.txt
	@echo "lock: $(REQ)/dev.txt (runtime + dev + sentry + otel: .venv, CI)"
	$(UV_COMPILE) pyproject.toml --extra dev --extra sentry --extra otel -c $(REQ)/runtime.txt \
		-o $(REQ)/dev.txt
	@echo "lock: $(REQ)/bench.txt (dev + bench: what make bench adds)"
	$(UV_COMPILE) pyproject.toml --extra dev --extra sentry --extra otel --extra bench \
		-c $(REQ)/dev.txt -o $(REQ)/bench.txt
	@echo "lock: $(REQ)/build.txt (the build backend of [build-system])"
	$(PYTHON) -c 'import tomllib; \
		print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(UV_COMPILE) - -o $(REQ)/build.txt

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

# Installs Debian's PACKAGE when make runs as root with apt-get (apt shows its
# progress); otherwise prints the one command to run and fails.
APT_INSTALL = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "$@: installing Debian's $(1) package (apt-get update, then apt-get install)"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(1) || exit 1; \
	else \
	  echo "$@: $(2); install it with: sudo apt-get install $(1)" >&2; exit 1; \
	fi

# RabbitMQ on AMQP_HOST:AMQP_PORT: left alone when something answers there, else
# rabbitmq-server (installed first when missing) started with -detached.
RABBITMQ_MISSING = nothing answers on $(AMQP_HOST):$(AMQP_PORT) and rabbitmq-server is not installed

rabbitmq:
	@if $(AMQP_UP); then \
	  echo "rabbitmq: $(AMQP_HOST):$(AMQP_PORT) answers"; \
	else \
	  command -v rabbitmq-server >/dev/null || { \
	    $(call APT_INSTALL,rabbitmq-server,$(RABBITMQ_MISSING)); }; \
	  if ! $(AMQP_UP); then \
	    echo "rabbitmq: starting rabbitmq-server -detached"; \
	    rabbitmq-server -detached; \
	  fi; \
	  for i in $$(seq $(RABBITMQ_WAIT_S)); do $(AMQP_UP) && break; sleep 1; done; \
	  $(AMQP_UP) || { \
	    echo "rabbitmq: port $(AMQP_PORT) still closed after $(RABBITMQ_WAIT_S) s" >&2; exit 1; }; \
	  rabbitmqctl await_startup --timeout $(RABBITMQ_WAIT_S) >/dev/null || { \
	    echo "rabbitmq: rabbitmqctl await_startup failed" >&2; exit 1; }; \
	  echo "rabbitmq: started"; \
	fi

# Headless Chromium renders the status page in tests/ops/test_status_page.py.
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	else \
	  $(call APT_INSTALL,chromium,the status page test needs headless Chromium); \
	fi

# Dovecot is the real IMAP server of the bounce mailbox tests (tests/support/imap.py
# starts its own, in the foreground, with a throwaway config; the package's own service
# is not needed). Debian installs the binary as /usr/sbin/dovecot.
dovecot:
	@if command -v dovecot >/dev/null || [ -x /usr/sbin/dovecot ]; then \
	  echo "dovecot: $$(command -v dovecot || echo /usr/sbin/dovecot)"; \
	else \
	  $(call APT_INSTALL,dovecot-imapd,the bounce mailbox tests need Dovecot's IMAP server); \
	fi

# In a terminal the log lines are readable ones (console), else JSON as shipped;
# FORMCRAFTD_LOG_FORMAT set in the environment wins.
run: venv rabbitmq
	@if [ -t 1 ] && [ -z "$$FORMCRAFTD_LOG_FORMAT" ]; then export FORMCRAFTD_LOG_FORMAT=console; fi; \
	  echo "$(BIN)/formcraftd run --config $(CONFIG)"; \
	  exec $(BIN)/formcraftd run --config $(CONFIG)

test: venv rabbitmq chromium dovecot
	$(BIN)/pytest $(PYTEST_ARGS)

test-worker: venv rabbitmq $(if $(filter email,$(WORKER)),dovecot)
	@case "$(WORKER)" in webhook|email|sheets) ;; \
	  *) echo "usage: make test-worker WORKER=webhook|email|sheets" >&2; exit 2;; esac
	$(BIN)/pytest -m $(WORKER) $(PYTEST_ARGS)

# Starts its own 3-node RabbitMQ cluster (fcc1-3@localhost, 127.0.0.1:5701-5703) and
# two daemons; a few minutes. `make test` skips it.
test-cluster: venv
	FORMCRAFTD_CLUSTER_TESTS=1 $(BIN)/pytest -m cluster tests/cluster -s $(PYTEST_ARGS)

# Installs requirements/bench.txt on top (Celery, requests, py-spy: benchmarks only,
# never a runtime dependency), then runs every benchmark and prints one table; a few minutes.
$(BENCH_STAMP): $(REQ)/bench.txt $(STAMP)
	@echo "bench: installing the locked benchmark tools from $(REQ)/bench.txt"
	$(PIP_LOCKED) -r $(REQ)/bench.txt
	touch $@

bench: $(BENCH_STAMP) rabbitmq
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The tests (and ruff, mypy) against the LOWEST version of every direct dependency
# that pyproject.toml allows, runtime and dev alike: its lower bounds must be honest.
# A scratch venv outside the tree; not part of `make test`; about 5 minutes.
# Narrow it with LOWEST_TESTS="tests/core tests/amqp" or PYTEST_ARGS="-x".
test-lowest: venv rabbitmq chromium dovecot
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	@echo "test-lowest: resolving the lowest allowed versions into $(LOWEST_VENV)/requirements.txt"
	$(UV) pip compile --quiet pyproject.toml --extra dev --extra sentry --extra otel \
		--resolution lowest-direct --python $(LOWEST_VENV)/bin/python --no-header \
		-o $(LOWEST_VENV)/requirements.txt
	@echo "test-lowest: installing them into $(LOWEST_VENV)"
	$(LOWEST_VENV)/bin/python -m pip --disable-pip-version-check install --require-hashes \
		--no-input -r $(REQ)/build.txt
	$(LOWEST_VENV)/bin/python -m pip --disable-pip-version-check install --no-input \
		-r $(LOWEST_VENV)/requirements.txt
	$(LOWEST_VENV)/bin/python -m pip --disable-pip-version-check install --no-input \
		--no-deps --no-build-isolation -e .
	$(LOWEST_VENV)/bin/python -m pip --disable-pip-version-check check
	$(LOWEST_VENV)/bin/ruff check --no-cache formcraftd tests bench
	$(LOWEST_VENV)/bin/mypy --cache-dir $(LOWEST_VENV)/mypy-cache formcraftd
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider $(LOWEST_TESTS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check formcraftd tests bench
	$(BIN)/mypy formcraftd
	$(BIN)/lint-imports

# Build and cache litter; the virtualenv stays (distclean removes it too).
clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache \
		./*.egg-info
	find formcraftd tests bench -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# --- Service install on a Debian/Ubuntu VM (as root; contrib/install.sh --help) ---
# `make install` builds a wheel of this checkout and installs it, from
# requirements/runtime.txt, in a new virtualenv under /opt/formcraftd/releases/,
# switches /opt/formcraftd/current to it, and sets up the user, /etc/formcraftd,
# /var/lib/formcraftd and the unit. Re-running it upgrades and keeps the config;
# `make rollback` goes back to the previous release; `make uninstall` keeps the
# config and the state (PURGE=1 removes them). DESTDIR=/some/root installs there;
# INSTALL_ARGS passes more options (--user, --python, --prefix, ...).
DESTDIR ?=
PURGE ?=
INSTALL_ARGS ?=
INSTALL_SH = contrib/install.sh --destdir "$(DESTDIR)" $(INSTALL_ARGS)

.PHONY: install upgrade rollback uninstall
install upgrade:
	$(INSTALL_SH) install

rollback:
	$(INSTALL_SH) rollback

uninstall:
	$(INSTALL_SH) uninstall $(if $(PURGE),--purge)
