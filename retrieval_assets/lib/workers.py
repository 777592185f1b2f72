"""Steps on celery workers: with CELERY_BROKER_URL set, every job's steps are celery tasks that
any worker started by `retrieval-assets worker` (on any machine with the same settings) runs.

The run itself (its orchestrator) still runs where it is launched (the CLI, the daemon's run
launcher, a K8s run job); it claims each step's pool slot in the instance storage before sending
the step, so the `bedrock` and `local_models` pools cap steps across all workers. Workers and
runs must share the instance storage (DAGSTER_POSTGRES_URL) and the stores (DATABASE_URL,
LANCEDB_URI). A worker killed mid-step fails that step's run (celery reports the lost worker);
the run retry (dagster.yaml: run_retries) re-executes it from the failed step, and the fill picks
up exactly the rows still NULL: only the batch in flight is redone.

A step whose worker died never reports its end, so Dagster never frees the pool slot it claimed:
left so, the pool stays full and every later step of that pool waits forever (seen in
tests/test_celery.py). The executor here frees the run's slots when its orchestration ends (no
step of it is in flight then); the daemon does the same for a run whose orchestrator died
(dagster.yaml: free_slots_after_run_end_seconds).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg

# dagster-celery registers its step task again for every step it sends; celery 5.7 warns each
# time ("Task name 'execute_plan' is already registered"). The task is the same function.
warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered")

# The same celery settings for the executor (which sends steps) and the workers (which run them).
CELERY_SETTINGS = {
    # A worker process takes one step at a time and reserves none ahead: a long fill does not
    # hold other steps queued behind it while another worker is idle.
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
    "result_expires": 86_400,
}
QUEUE = "dagster"  # dagster-celery's default queue: what `retrieval-assets worker` consumes


def broker_url() -> str:
    """CELERY_BROKER_URL, which a worker cannot start without."""
    import os

    from retrieval_assets.lib.settings import ConfigError

    if "CELERY_BROKER_URL" not in os.environ:
        raise ConfigError("CELERY_BROKER_URL is not set: a worker needs the broker runs send to")
    return os.environ["CELERY_BROKER_URL"]


def result_backend(broker_url: str) -> str:
    """Redis keeps the step results itself; RabbitMQ returns them as messages (rpc://)."""
    return broker_url if broker_url.startswith(("redis://", "rediss://")) else "rpc://"


def _slot_releasing_executor() -> dg.ExecutorDefinition:
    """dagster-celery's executor, freeing the pool slots its run still holds when it ends."""
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

    class SlotReleasingCeleryExecutor(CeleryExecutor):
        def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
            try:
                yield from super().execute(plan_context, execution_plan)
            finally:  # every step has answered or was lost: nothing of this run holds a slot
                storage = plan_context.instance.event_log_storage
                if storage.supports_global_concurrency_limits:
                    storage.free_concurrency_slots_for_run(plan_context.run_id)

    @dg.executor(
        name="celery",
        config_schema=CELERY_CONFIG,
        requirements=dg.multiple_process_executor_requirements(),
    )
    def executor(init_context: dg.InitExecutorContext) -> SlotReleasingCeleryExecutor:
        config = init_context.executor_config
        return SlotReleasingCeleryExecutor(
            broker=config.get("broker"),
            backend=config.get("backend"),
            config_source=config.get("config_source"),
            include=config.get("include"),
            retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
        )

    return executor


def celery_executor(broker_url: str) -> Any:
    """The celery executor, sending steps through CELERY_BROKER_URL (resolved by Dagster at
    launch; `broker_url` only decides where results come back)."""
    executor = _slot_releasing_executor()
    backend = result_backend(broker_url)
    return executor.configured(
        {
            "broker": {"env": "CELERY_BROKER_URL"},
            "backend": {"env": "CELERY_BROKER_URL"} if backend == broker_url else backend,
            "config_source": CELERY_SETTINGS,
        },
        name="celery",
    )


def worker_app_args(broker_url: str) -> dict[str, Any]:
    """The worker's celery app arguments: the executor's, for the same broker."""
    from dagster_celery.executor import CeleryExecutor

    return CeleryExecutor.for_cli(
        broker=broker_url, backend=result_backend(broker_url), config_source=CELERY_SETTINGS
    ).app_args()
