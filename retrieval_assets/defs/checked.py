"""Assets whose store checks run in the asset's own step, and on their own.

Each step is a process of its own (the multiprocess executor), and starting one costs more than
most of these checks: a check as a separate step made a run with nothing new pay for eight more
processes. So an asset with store checks is a subsettable multi-asset of one asset: a run that
materializes it evaluates its checks in the same step, and a run that selects only the checks
(the nightly consistency job, "Execute" on a check in the UI) runs the same step without
materializing anything.
"""

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg


def asset_spec(
    key: dg.AssetKey,
    *,
    deps: Sequence[dg.AssetKey],
    group_name: str,
    kinds: set[str],
    description: str,
    code_version: str = "1",
    **more: Any,
) -> dg.AssetSpec:
    """What @dg.asset says for the house's other assets: the owner, a code version, and eager
    automation (an asset follows its upstream once the automation sensor runs)."""
    return dg.AssetSpec(
        key,
        deps=deps,
        group_name=group_name,
        kinds=kinds,
        description=description,
        owners=["team:data-platform"],
        code_version=code_version,
        automation_condition=dg.AutomationCondition.eager(),
        **more,
    )


def checked_asset(
    spec: dg.AssetSpec, checks: Sequence[dg.AssetCheckSpec], **multi_asset_args: Any
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """`@dg.asset` for one asset with its store checks. The body materializes `spec.key` only
    when `materializing(context, key)`, and yields the checks `wanted(context, key, name)`."""
    return dg.multi_asset(
        # The step keeps the name @dg.asset gives it (pools, tests and the UI refer to it).
        name=spec.key.to_python_identifier(),
        specs=[spec],
        check_specs=checks,
        can_subset=True,
        **multi_asset_args,
    )


def materializing(context: dg.AssetExecutionContext, key: dg.AssetKey) -> bool:
    """The run selected the asset itself, not only its checks."""
    return key in context.selected_asset_keys


def wanted(context: dg.AssetExecutionContext, key: dg.AssetKey, check: str) -> bool:
    return dg.AssetCheckKey(key, check) in context.selected_asset_check_keys


def runs_alone(definition: dg.AssetsDefinition) -> bool:
    """Its checks can run without materializing: a standalone check, or a subsettable asset's."""
    return isinstance(definition, dg.AssetChecksDefinition) or definition.can_subset
