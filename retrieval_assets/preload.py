"""Imported by the step processes' forkserver (see definitions.EXECUTOR): the definitions and the
main job are built here once, and the libraries every store step imports are imported here once,
so each step process forks with them in memory instead of paying for them again.

LanceDB (the slowest import of a store step) warns that fork support is experimental: a fork
while another thread is inside one of its operations could deadlock the child. This process
imports it and does nothing else with it, so no operation is ever in flight when it forks; the
warning is silenced for that.
"""

import importlib
import os
import warnings

import lancedb  # noqa: F401  (imported for the step processes)

from retrieval_assets.cli import main_job

warnings.filterwarnings(
    "ignore", message="lancedb fork support is experimental", category=RuntimeWarning
)
main_job()


def _import_instance_storage() -> None:
    """Import what a step process needs before its first event and nothing here otherwise
    imports: the classes of the instance's storage, as DAGSTER_HOME configures it (SQLite, or
    Postgres where DAGSTER_POSTGRES_URL is set), with SQLAlchemy's dialects and Alembic. The
    instance is not opened: a connection must not cross a fork. Without this each step process
    imported them itself, about 1.5 s per step."""
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import ConfigurableClassData

    for module in ("sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql", "alembic"):
        importlib.import_module(module)
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return
    for data in InstanceRef.from_dir(home)._asdict().values():
        if isinstance(data, ConfigurableClassData):
            getattr(importlib.import_module(data.module_name), data.class_name, None)


_import_instance_storage()
