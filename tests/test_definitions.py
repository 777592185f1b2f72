"""The code location loads, quickly and without heavy imports, with the expected inventory."""

import os
import subprocess
import sys

import dagster as dg

from retrieval_assets.cli import instance_yaml
from retrieval_assets.definitions import defs
from retrieval_assets.defs.automation.jobs import QUALITY_CHECK
from retrieval_assets.defs.vectors.columns import column_definitions
from retrieval_assets.lib.columns import LOCAL_MODELS_POOL
from tests.conftest import EXTRA

EXPECTED_ASSETS = {
    "postgres/conversations",
    "postgres/conversation_chunks",
    "lancedb/conversation_chunks",
    "lancedb/coarse_vectors",
    "lancedb/fine_vectors",
    "lancedb/coarse_index",
    "postgres/titan_vectors",
    "lancedb/chunk_table_maintenance",
    "lancedb/search_snapshot",
    "lancedb/lexical_index",
    "postgres/lexical_index",
}
EXPECTED_RESOURCES = {
    "postgres",
    "lancedb",
    "conversation_source",
    "chunker",
    "coarse_model",
    "fine_model",
    "titan_model",
}


def test_definitions_load_with_expected_assets_and_resources():
    loaded = defs()
    keys = {k.to_user_string() for k in loaded.resolve_asset_graph().get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    assert EXPECTED_RESOURCES <= set(loaded.resources)
    assert loaded.resolve_job_def("retrieval_job") is not None
    dg.Definitions.validate_loadable(loaded)


def test_every_asset_is_described_grouped_and_versioned():
    graph = defs().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, f"{key} has no description"
        assert node.group_name != "default", f"{key} has no group"
        assert node.code_version, f"{key} has no code_version"
        assert node.kinds, f"{key} has no kinds"


def test_loading_the_code_location_imports_no_model_or_store_library():
    probe = (
        "import sys; from retrieval_assets.definitions import defs; defs(); "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'fastembed', 'lancedb', "
        "'onnxruntime', 'tokenizers', 'usearch') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_workspace_yaml_loads_through_dagster_cli(tmp_path):
    # Its own instance, written from the project's dagster.yaml as `retrieval-assets ui` writes
    # it: the check must not depend on what an earlier command left in .data/.
    (tmp_path / "dagster.yaml").write_text(instance_yaml(str(tmp_path)))
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_automation_inventory():
    loaded = defs()
    sensors = {s.name for s in loaded.sensors}
    assert sensors == {
        "coarse_backlog_sensor",
        "fine_backlog_sensor",
        "titan_backlog_sensor",
        "automation_sensor",
    }
    assert all(s.minimum_interval_seconds for s in loaded.sensors if "backlog" in s.name)
    assert {s.name for s in loaded.schedules} == {
        "ingestion_schedule",
        "nightly_consistency_schedule",
    }
    for name in ("coarse_backfill", "fine_backfill", "titan_backfill"):
        job = loaded.resolve_job_def(name)
        assert len(job.partitions_def.get_partition_keys()) == 16
    checks = loaded.resolve_job_def("consistency_check_job")
    assert checks is not None
    graph = loaded.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        if key.to_user_string() != "postgres/conversations":  # ingestion runs on its schedule
            assert graph.get(key).automation_condition is not None, key


def test_each_asset_can_be_materialized_alone_with_its_checks():
    """Selecting one asset (as the UI's Materialize and `dagster asset materialize` do) selects
    its checks too; a multi-asset check that cannot be subset would refuse to build the job."""
    keys = defs().resolve_asset_graph().get_all_asset_keys()
    jobs = [
        dg.define_asset_job(
            f"only_{key.to_python_identifier()}",
            selection=dg.AssetSelection.assets(key).required_multi_asset_neighbors(),
        )
        for key in keys
    ]
    loaded = dg.Definitions.merge(defs(), dg.Definitions(jobs=jobs))
    for job in jobs:
        assert loaded.resolve_job_def(job.name).asset_layer.asset_graph is not None, job.name


def test_steps_that_run_a_model_over_the_corpus_declare_their_pool():
    """The pools in dagster.yaml cap these steps across all runs: Bedrock calls by the quota,
    local model fills at one at a time (each already uses every core)."""
    expected = {
        "lancedb__coarse_vectors": "local_models",
        "lancedb__fine_vectors": "local_models",
        "postgres__titan_vectors": "bedrock",
    }
    pools = {
        node.name: node.pool
        for job in defs().resolve_all_job_defs()
        for node in job.all_node_defs
        if node.name in expected
    }
    assert pools == expected


def test_one_declaration_makes_a_columns_asset_backfill_sensor_and_checks():
    loaded = dg.Definitions.merge(defs(), column_definitions(EXTRA))
    key = dg.AssetKey(["lancedb", "extra_vectors"])
    graph = loaded.resolve_asset_graph()
    assert key in graph.get_all_asset_keys()
    node = graph.get(key)
    assert node.partitions_def is not None and len(node.partitions_def.get_partition_keys()) == 16
    assert node.backfill_policy == dg.BackfillPolicy.single_run()
    assert [k.to_user_string() for k in node.parent_keys] == ["lancedb/conversation_chunks"]
    backfill = loaded.resolve_job_def("extra_backfill")
    nodes = {n.name: n for n in backfill.all_node_defs}
    assert set(nodes) == {"lancedb__extra_vectors"}  # its checks run in its step
    assert nodes["lancedb__extra_vectors"].pool == LOCAL_MODELS_POOL
    sensor = loaded.resolve_sensor_def("extra_backlog_sensor")
    assert sensor.job_name == "extra_backfill" and sensor.minimum_interval_seconds
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == key}
    assert checks == {"null_backlog", "dims_match_declared", "unit_norms"}
    dg.Definitions.validate_loadable(loaded)


def test_the_nightly_job_selects_every_check_that_runs_alone_by_rule():
    """Every check that can run without materializing its asset (a standalone check, or one of a
    subsettable asset's) is in the consistency job, whoever adds it; none that is computed from a
    materialization's own work (that would need the asset's run)."""
    loaded = defs()
    graph = loaded.resolve_asset_graph()
    job = loaded.resolve_job_def("consistency_check_job")
    alone = [
        d
        for d in [*(loaded.assets or []), *(loaded.asset_checks or [])]
        if isinstance(d, dg.AssetChecksDefinition) or d.can_subset
    ]
    selected = set(job.asset_layer.asset_graph.asset_check_keys)
    assert selected == {key for d in alone for key in d.check_keys}
    names = {k.name for k in selected}
    assert {
        "search_snapshot_recall_at_10",
        "coarse_recall_at_10",
        "no_quarantined_rows",
        "null_backlog",
        "chunk_counts_agree",
        "retrieval_quality",
        "lexical_index_covers_chunks",
    } <= names
    # The ingestion's checks describe its read of the source: they come with its runs.
    assert {"source_read_completely", "source_records_accepted"}.isdisjoint(names)
    assert selected < set(graph.asset_check_keys)
    # The main job runs every check but the canary, which it names (a name that resolves).
    main = loaded.resolve_job_def("retrieval_job").asset_layer.asset_graph.asset_check_keys
    assert QUALITY_CHECK in graph.asset_check_keys and QUALITY_CHECK in selected
    assert set(graph.asset_check_keys) - set(main) == {QUALITY_CHECK}
    # It materializes nothing: the checks' steps (an asset's own step, running only its checks).
    assert job.asset_layer.selected_asset_keys == set()
    assert {n.name for n in job.all_node_defs} == {d.node_def.name for d in alone}


def test_a_run_of_the_main_job_has_one_step_per_asset_node():
    """Store checks run in their asset's step (defs/checked.py): a step is a process, and a run
    with nothing new paid more for the checks' processes than for their work."""
    loaded = defs()
    job = loaded.resolve_job_def("retrieval_job")
    asset_nodes = {
        d.node_def.name
        for d in loaded.assets or []
        if isinstance(d, dg.AssetsDefinition) and not isinstance(d, dg.AssetChecksDefinition)
    }
    assert {n.name for n in job.all_node_defs} == asset_nodes


def test_every_asset_has_the_ingestion_freshness_policy_and_the_instance_evaluates_it():
    import yaml

    from retrieval_assets.defs.automation.schedules import INGESTION_FRESHNESS

    graph = defs().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).freshness_policy == INGESTION_FRESHNESS, key
    assert INGESTION_FRESHNESS.warn_window.to_timedelta().total_seconds() == 3600
    assert yaml.safe_load(instance_yaml("."))["freshness"] == {"enabled": True}
