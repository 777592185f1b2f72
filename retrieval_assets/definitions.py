"""The one entry point: everything under defs/, plus what spans all of it: the executor, the
automation sensor and the nightly consistency check of every store."""

import functools
import os
import warnings
from pathlib import Path

import dagster as dg

from retrieval_assets import defs as defs_folder
from retrieval_assets.defs.automation.schedules import INGESTION_FRESHNESS
from retrieval_assets.defs.checked import runs_alone
from retrieval_assets.lib import step_server
from retrieval_assets.lib.settings import check_environment, is_set
from retrieval_assets.lib.workers import celery_executor


def consistency_checks(loaded: dg.Definitions) -> dg.AssetSelection:
    """Every check that can run without its asset (a standalone check, or one of a subsettable
    asset's: defs/checked.py): they read the stores and materialize nothing. Checks computed
    from a materialization's own work come with their asset's runs. Selected by that rule, so a
    new check joins the nightly job by being one."""
    found = [
        key
        for d in [*(loaded.assets or []), *(loaded.asset_checks or [])]
        if isinstance(d, dg.AssetsDefinition) and runs_alone(d)
        for key in d.check_keys
    ]
    return dg.AssetSelection.checks(*found)


# Preview functions this module calls (the defs-folder loader calls two of its own): they are
# pinned with dagster and covered by the tests; said here, not by every process that loads them.
warnings.filterwarnings(
    "ignore",
    message=r"Function `(load_definitions_from_module|Definitions\.map_(resolved_)?asset_specs)",
    category=dg.PreviewWarning,
)

# Each step process forks from a server that imported this module and built the definitions
# once (the multiprocess executor's forkserver), instead of starting Python, importing dagster and
# building them again for each of a run's steps (README: the step start).
EXECUTOR = dg.multiprocess_executor.configured(
    {
        "max_concurrent": 2,  # two cores here: one step per core; raise it on bigger machines
        "start_method": {"forkserver": {"preload_modules": step_server.PRELOAD}},
    }
)


def executor() -> dg.ExecutorDefinition:
    """Steps on this machine (EXECUTOR), or on celery workers when CELERY_BROKER_URL is set."""
    check_environment()
    if not is_set("CELERY_BROKER_URL"):
        return EXECUTOR
    return celery_executor(os.environ["CELERY_BROKER_URL"])


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()


@functools.cache
def build_definitions() -> dg.Definitions:
    """The definitions, built once per process."""
    # The defs folder through its module, not a search for pyproject.toml: an installed wheel
    # has none (load_from_defs_folder would fail there).
    loaded = dg.ComponentTree(
        defs_module=defs_folder,
        project_root=Path(__file__).resolve().parents[1],
        code_location_name="retrieval_assets",
    ).build_defs()
    # Every asset follows the 15-minute ingestion (eagerly, once the automation sensor is on).
    loaded = loaded.map_asset_specs(
        func=lambda spec: dg.apply_freshness_policy(spec, INGESTION_FRESHNESS)
    )
    consistency_check_job = dg.define_asset_job(
        "consistency_check_job",
        selection=consistency_checks(loaded),
        description="Every store-level check: NULL backlogs, dims, norms, chunk counts, ANN "
        "recall, quarantine. Reads only; materializes nothing.",
    )
    return dg.Definitions.merge(
        loaded,
        dg.Definitions(
            executor=executor(),
            # Downstream assets follow their upstream (AutomationCondition.eager) once this runs.
            sensors=[
                dg.AutomationConditionSensorDefinition(
                    "automation_sensor",
                    target=dg.AssetSelection.all(),
                    default_status=dg.DefaultSensorStatus.STOPPED,
                )
            ],
            jobs=[consistency_check_job],
            schedules=[
                dg.ScheduleDefinition(
                    name="nightly_consistency_schedule",
                    job=consistency_check_job,
                    cron_schedule="30 2 * * *",
                    execution_timezone="UTC",
                    default_status=dg.DefaultScheduleStatus.STOPPED,
                    description="Run every store-level asset check at 02:30 UTC.",
                )
            ],
        ),
    )
