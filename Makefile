# formcraftd — set up, run and test. The machine needs python3 and
# rabbitmq-server; everything else is installed into .venv by `make venv`.
#
#   make run                     set up, start RabbitMQ if needed, run the daemon
#   make test                    every test (PYTEST_ARGS="-k breaker -x" to narrow)
#   make test-worker WORKER=email   one worker's tests (webhook | email | sheets)
#   make bench | lint | clean | distclean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=
WORKER ?=
AMQP_HOST ?= 127.0.0.1
AMQP_PORT ?= 5672
RABBITMQ_WAIT_S ?= 60

# Exit status 0 when something accepts TCP connections on AMQP_HOST:AMQP_PORT.
AMQP_UP = $(PYTHON) -c 'import socket, sys; s = socket.socket(); s.settimeout(1); \
	sys.exit(s.connect_ex(("$(AMQP_HOST)", $(AMQP_PORT))) != 0)'

.PHONY: venv rabbitmq run test test-worker test-cluster bench lint clean distclean
.DEFAULT_GOAL := test

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever pyproject.toml is newer than the stamp (new dependency, extra, ...).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

rabbitmq:
	@if $(AMQP_UP); then \
	  echo "rabbitmq: $(AMQP_HOST):$(AMQP_PORT) answers"; \
	else \
	  command -v rabbitmq-server >/dev/null || { \
	    echo "rabbitmq: nothing on $(AMQP_HOST):$(AMQP_PORT) and rabbitmq-server is not installed" >&2; \
	    exit 1; }; \
	  echo "rabbitmq: starting rabbitmq-server -detached"; \
	  rabbitmq-server -detached; \
	  for i in $$(seq $(RABBITMQ_WAIT_S)); do $(AMQP_UP) && break; sleep 1; done; \
	  $(AMQP_UP) || { \
	    echo "rabbitmq: port $(AMQP_PORT) still closed after $(RABBITMQ_WAIT_S) s" >&2; exit 1; }; \
	  rabbitmqctl await_startup --timeout $(RABBITMQ_WAIT_S) >/dev/null || { \
	    echo "rabbitmq: rabbitmqctl await_startup failed" >&2; exit 1; }; \
	  echo "rabbitmq: started"; \
	fi

run: venv rabbitmq
	$(BIN)/formcraftd run --config $(CONFIG)

test: venv rabbitmq
	$(BIN)/pytest $(PYTEST_ARGS)

test-worker: venv rabbitmq
	@case "$(WORKER)" in webhook|email|sheets) ;; \
	  *) echo "usage: make test-worker WORKER=webhook|email|sheets" >&2; exit 2;; esac
	$(BIN)/pytest -m $(WORKER) $(PYTEST_ARGS)

# Starts its own 3-node RabbitMQ cluster (fcc1-3@localhost, 127.0.0.1:5701-5703) and
# two daemons; a few minutes. `make test` skips it.
test-cluster: venv
	FORMCRAFTD_CLUSTER_TESTS=1 $(BIN)/pytest -m cluster tests/cluster -s $(PYTEST_ARGS)

# Installs the bench extra first (Celery, requests, py-spy: benchmarks only, never a
# runtime dependency), then runs every benchmark and prints one table; a few minutes.
bench: venv rabbitmq
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check formcraftd tests bench
	$(BIN)/mypy formcraftd

# Build and cache litter; the virtualenv stays (distclean removes it too).
clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis ./*.egg-info
	find formcraftd tests bench -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
