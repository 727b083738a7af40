"""The import rules of pyproject.toml's [tool.importlinter], checked by `lint-imports`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The console script of the environment running the tests (.venv, or the lowest-versions venv).
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

LAYERS = "Layers: cli > daemon > admin > ops > amqp | workers > core"
WORKERS_INDEPENDENT = "The workers are independent of each other"
WORKERS_NO_AMQP = "Workers know no AMQP"
CORE_NO_IO = "The core does no I/O of AMQP or HTTP"
AMQP_NO_WORKER = "The AMQP layer knows no worker"
NO_CYCLES = "No import cycles between the siblings of any package"
OTEL_ONLY_IN_TRACING = "Only formcraftd.ops.tracing imports OpenTelemetry"
TRACING_LOADED_BY_NAME = "Nothing imports formcraftd.ops.tracing statically"
CONTRACTS = (
    LAYERS,
    WORKERS_INDEPENDENT,
    WORKERS_NO_AMQP,
    CORE_NO_IO,
    AMQP_NO_WORKER,
    NO_CYCLES,
    OTEL_ONLY_IN_TRACING,
    TRACING_LOADED_BY_NAME,
)
# Older import-linter releases colour their output whatever NO_COLOR says.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def lint_imports(tree: Path) -> tuple[int, str]:
    """Run lint-imports on the package under `tree` with the pyproject.toml found there.

    Returns its exit status and its output (stdout and stderr, without colours).
    """
    # The tree goes first on the path, so the package analysed is this tree's even when
    # another copy of formcraftd is installed (editable) in the environment.
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, ANSI_ESCAPE.sub("", result.stdout + result.stderr)


def test_the_package_keeps_every_import_contract() -> None:
    """lint-imports passes on the package as it is, and checks every contract we name here."""
    status, output = lint_imports(ROOT)
    assert status == 0, output
    for name in CONTRACTS:
        assert f"{name} KEPT" in output, output


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml that a test may break."""
    shutil.copytree(
        ROOT / "formcraftd", tmp_path / "formcraftd", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, source: str) -> None:
    """Add `source` at the end of a module of the copy."""
    path.write_text(path.read_text() + "\n" + source + "\n")


TYPE_ONLY = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import {module}\n"


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("workers/webhook/handler.py", "import aio_pika", WORKERS_NO_AMQP),
        ("workers/sheets/api.py", "from pamqp.commands import Basic", WORKERS_NO_AMQP),
        ("core/retry.py", "import formcraftd.ops.metrics", LAYERS),
        ("core/jobs.py", "import aiohttp", CORE_NO_IO),
        ("workers/email/handler.py", "import formcraftd.workers.sheets.api", WORKERS_INDEPENDENT),
        ("amqp/consumer.py", "import formcraftd.workers.webhook.handler", AMQP_NO_WORKER),
        ("amqp/consumer.py", "import formcraftd.workers.webhook.handler", LAYERS),
        ("amqp/pipeline.py", "import opentelemetry.trace", OTEL_ONLY_IN_TRACING),
        ("daemon.py", "import formcraftd.ops.tracing", TRACING_LOADED_BY_NAME),
        # An import made only for the type checker counts like any other.
        ("core/limits.py", TYPE_ONLY.format(module="formcraftd.amqp.acks"), LAYERS),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    package_copy: Path, module: str, source: str, broken: str
) -> None:
    """Adding an import the rules forbid makes lint-imports fail and name the contract."""
    append(package_copy / "formcraftd" / module, source)
    status, output = lint_imports(package_copy)
    assert status != 0, output
    assert f"{broken} BROKEN" in output, output


def test_a_type_only_import_cycle_breaks_the_acyclic_contract(package_copy: Path) -> None:
    """Two core modules importing each other, one of them only under TYPE_CHECKING, fail."""
    core = package_copy / "formcraftd" / "core"
    (core / "cycle_a.py").write_text("import formcraftd.core.cycle_b\n")
    (core / "cycle_b.py").write_text(TYPE_ONLY.format(module="formcraftd.core.cycle_a"))
    status, output = lint_imports(package_copy)
    assert status != 0, output
    assert f"{NO_CYCLES} BROKEN" in output, output
    assert f"{LAYERS} KEPT" in output, output


def test_a_top_level_module_outside_every_layer_breaks_the_layers(package_copy: Path) -> None:
    """A new module directly under formcraftd must be given a layer (the contract is exhaustive)."""
    (package_copy / "formcraftd" / "misc.py").write_text('"""Belongs nowhere."""\n')
    status, output = lint_imports(package_copy)
    assert status != 0, output
    assert f"{LAYERS} BROKEN" in output, output
