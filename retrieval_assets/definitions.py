"""The one entry point: everything under defs/ plus the executor and the automation sensor."""

from pathlib import Path

import dagster as dg

from retrieval_assets import defs as defs_folder


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        # The defs folder through its module, not a search for pyproject.toml: an installed wheel
        # has none (load_from_defs_folder would fail there).
        dg.ComponentTree(
            defs_module=defs_folder,
            project_root=Path(__file__).resolve().parents[1],
            code_location_name="retrieval_assets",
        ).build_defs(),
        # Two cores here: one step per core. Raise max_concurrent on bigger machines.
        dg.Definitions(
            executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
            # Downstream assets follow their upstream (AutomationCondition.eager) once this runs.
            sensors=[
                dg.AutomationConditionSensorDefinition(
                    "automation_sensor",
                    target=dg.AssetSelection.all(),
                    default_status=dg.DefaultSensorStatus.STOPPED,
                )
            ],
        ),
    )
