"""The one entry point: everything under defs/ plus the executor and the automation sensor."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
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
