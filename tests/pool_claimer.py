"""One run's orchestrator claiming a pool slot, for tests/test_instance.py (one process each):

    python -m tests.pool_claimer <run_id>

Opens the instance DAGSTER_HOME names, prints "ready" and waits for a line on stdin (so every
claimer starts at once). Then it sets the pool up from the default limit if no run has yet,
claims the `bedrock` slot as Dagster's executors do (asking again until it is given), holds it a
moment, frees it, and prints when it held it, as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import dagster as dg

HOLD_SECONDS = 0.05

if __name__ == "__main__":
    run_id = sys.argv[1]
    instance = dg.DagsterInstance.get()  # held: the storage refers back to it
    storage = instance.event_log_storage
    print("ready", flush=True)
    sys.stdin.readline()
    if "bedrock" not in {pool.name for pool in storage.get_pool_limits()}:  # as a run's first claim
        storage.initialize_concurrency_limit_to_default("bedrock")
    deadline = time.monotonic() + 60
    while not storage.claim_concurrency_slot("bedrock", run_id, "titan").is_claimed:
        if time.monotonic() > deadline:
            sys.exit(f"{run_id} never got the slot")
        time.sleep(0.01)
    start = time.monotonic()  # one clock for every process (CLOCK_MONOTONIC)
    time.sleep(HOLD_SECONDS)
    end = time.monotonic()
    storage.free_concurrency_slot_for_step(run_id, "titan")
    print(json.dumps([start, end]), flush=True)
