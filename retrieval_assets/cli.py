"""Command line for retrieval_assets.

retrieval-assets run                        materialize every asset (embedded default unless set)
retrieval-assets status                     counts per store and the NULL backlog
retrieval-assets search "text"              hybrid (BM25 + dense, fused) search in LanceDB
retrieval-assets search --mode dense "text"       coarse top-100 (FastEmbed), reranked (ST)
retrieval-assets search --store postgres "text"   the same modes through Postgres' match RPCs
retrieval-assets replay-quarantine          retry chunks quarantined after Titan failures
retrieval-assets titan-dims 512             write (embedded default: apply) the migration
retrieval-assets migrate                    bring the database's schema to head (alembic upgrade)
retrieval-assets worker                     a celery worker for the steps (CELERY_BROKER_URL set)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

from retrieval_assets.lib.paths import DEFAULT_DATA_DIR, INSTANCE_DIR

MAIN_JOB = "retrieval_job"


# Added to the project's dagster.yaml for each instance: its storage, Dagster's own except that
# pool slots are claimed and freed under one lock (lib/instance_storage.py says why). SQLite in the
# instance's folder, or Postgres when DAGSTER_POSTGRES_URL is set (the URL stays in the
# environment, never in the file).
SQLITE_STORAGE = """
# Added for this instance: the event log (with the pools' slots) in its folder.
event_log_storage:
  module: retrieval_assets.lib.instance_storage
  class: PoolSafeSqliteEventLogStorage
  config:
    base_dir: {base_dir}
"""
POSTGRES_STORAGE = """
# Added because DAGSTER_POSTGRES_URL is set: runs, events (with the pools' slots) and schedules
# in Postgres.
run_storage:
  module: dagster_postgres.run_storage
  class: PostgresRunStorage
  config:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
event_log_storage:
  module: retrieval_assets.lib.instance_storage
  class: PoolSafePostgresEventLogStorage
  config:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
schedule_storage:
  module: dagster_postgres.schedule_storage
  class: PostgresScheduleStorage
  config:
    postgres_url:
      env: DAGSTER_POSTGRES_URL
"""


def instance_yaml(home: str, environ: Mapping[str, str] = os.environ) -> str:
    """The configuration of the instance in folder `home`: the project's dagster.yaml and the
    storage section, Postgres where `environ` sets DAGSTER_POSTGRES_URL."""
    import json

    text = (INSTANCE_DIR / "dagster.yaml").read_text()
    if environ.get("DAGSTER_POSTGRES_URL"):
        return text + POSTGRES_STORAGE
    base_dir = os.path.join(os.path.abspath(home), "history", "runs")  # Dagster's own place
    return text + SQLITE_STORAGE.format(base_dir=json.dumps(base_dir))  # JSON is YAML: quoted


def _ensure_dagster_home() -> None:
    """Runs started here land in the same instance `dagster dev` shows (see ./dev)."""
    home = os.environ.setdefault("DAGSTER_HOME", str(DEFAULT_DATA_DIR / "dagster"))
    os.makedirs(home, exist_ok=True)
    path = os.path.join(home, "dagster.yaml")
    wanted = instance_yaml(home)
    if os.path.islink(path) or not os.path.exists(path) or open(path).read() != wanted:
        if os.path.lexists(path):
            os.unlink(path)
        with open(path, "w") as out:
            out.write(wanted)


def cmd_ui(args: argparse.Namespace) -> int:
    """The web UI and the daemon (dagster dev) on this project's instance, as a child process:
    this one holds the embedded server meanwhile and stops it when dagster dev exits."""
    import signal
    import subprocess

    _ensure_dagster_home()
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    workspace = str(INSTANCE_DIR / "workspace.yaml")
    started: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        for child in started:  # dagster dev shuts its own processes down, then we return
            child.send_signal(signum)

    # Handled before the child starts: a handled signal is reset to the default in the child,
    # but an ignored one stays ignored (as SIGINT is for a command started in the background by
    # a script), and dagster dev, finding SIGINT ignored, ignores SIGTERM too: nothing stops it.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen(
        [dagster, "dev", "-w", workspace, *args.dagster_args],
        # In a session of its own, so a Ctrl-C or a SIGTERM to this group reaches it once, from
        # here; in the instance's folder, which holds the dagster.yaml it uses (dagster dev warns
        # about the project's template in any other folder).
        start_new_session=True,
        cwd=os.environ["DAGSTER_HOME"],
        # `dagster dev` says it is superseded by `dg dev` (dagster-dg-cli, not installed here).
        env={
            **os.environ,
            "PYTHONWARNINGS": ",".join(
                w
                for w in (
                    os.environ.get("PYTHONWARNINGS"),
                    "ignore:Function `dev_command` is superseded",
                )
                if w
            ),
        },
    )
    started.append(child)
    code = child.wait()
    # A run worker or a sensor's code server can outlive dagster dev; left alone it would reach
    # for the embedded server after this command stopped it, and start it again. Nothing of the
    # UI's session outlives the command, so the server is stopped for good.
    _end_session(child.pid)
    return code


def _end_session(sid: int, grace: float = 60.0) -> None:
    """SIGTERM every process left in session `sid`, SIGKILL what is still there after `grace`."""
    import psutil

    def left() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    procs = left()
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive + left():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def cmd_stop_db(_: argparse.Namespace) -> int:
    """Stop the embedded PostgreSQL (one left running after a crash, say)."""
    from retrieval_assets.lib.embedded_postgres import stop_embedded
    from retrieval_assets.lib.settings import data_dir

    stopped = stop_embedded(data_dir())
    print(f"embedded PostgreSQL in {data_dir() / 'pg'}: {'stopped' if stopped else 'not running'}")
    return 0


@contextmanager
def _resources(*keys: str) -> Iterator[Any]:
    """The named resources as a run would have them: EnvVars resolved, set up, torn down after."""
    import dagster as dg

    from retrieval_assets.defs.resources import resources_from_environment

    bound = resources_from_environment()
    with dg.build_resources({key: bound[key] for key in keys}) as resources:
        yield resources


def _needs_broker() -> None:
    from retrieval_assets.lib.workers import broker_url

    broker_url()


def cmd_worker(args: argparse.Namespace) -> int:
    """A celery worker for the steps runs send through CELERY_BROKER_URL (README: Running on a
    cluster), as a child process: this one holds the embedded server meanwhile, if in use."""
    import signal
    import subprocess

    from retrieval_assets.lib.workers import QUEUE

    _ensure_dagster_home()
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    child = subprocess.Popen(
        [
            celery,
            "-A",
            "retrieval_assets.celery_worker",
            "worker",
            "--queues",
            QUEUE,
            "--concurrency",
            str(args.concurrency),
            "--hostname",
            f"{args.name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
    )

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)  # celery finishes the steps in hand on SIGTERM, then exits

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


def cmd_run(_: argparse.Namespace) -> int:
    from retrieval_assets.lib.settings import is_set

    _ensure_dagster_home()
    if not is_set("CELERY_BROKER_URL"):  # else the steps run on celery workers
        from retrieval_assets.lib import step_server

        step_server.start_early()
    import dagster as dg

    from retrieval_assets.defs.vectors.columns import ALL_SHARDS

    started = time.monotonic()
    # Through the job's own executor (multiprocess: a process per step, two at a time), as the
    # daemon would run it; the run lands in the same instance the web UI shows.
    with (
        dg.DagsterInstance.get() as instance,
        dg.execute_job(
            dg.reconstructable(main_job),
            instance=instance,
            raise_on_error=False,
            tags=ALL_SHARDS,  # the vector columns whole: every shard, in this one run
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        ) as result,
    ):
        _summarize(result, started)
    return 0 if result.success else 1


def main_job():
    """The main job, for Dagster to rebuild in each step process."""
    from retrieval_assets.definitions import defs

    return defs().resolve_job_def(MAIN_JOB)


def _summarize(result, started: float) -> None:
    print(
        f"\n{MAIN_JOB}: {'succeeded' if result.success else 'FAILED'} "
        f"in {time.monotonic() - started:.1f}s (run {result.run_id})"
    )
    shown_keys = set()
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        if mat.asset_key in shown_keys:  # a vector column's other shards: the same figures
            continue
        shown_keys.add(mat.asset_key)
        meta = {k: v.value for k, v in mat.metadata.items() if not hasattr(v, "md_str")}
        shown = ", ".join(
            f"{k}={v}"
            for k, v in meta.items()
            if isinstance(v, int | float | bool) and not k.startswith("dagster/")
        )
        rows = meta.get("dagster/row_count")
        print(f"  {mat.asset_key.to_user_string():<32} rows={rows}  {shown}")
    for check in result.get_asset_check_evaluations():
        print(
            f"  check {check.asset_key.to_user_string()}:{check.check_name} "
            f"{'passed' if check.passed else 'FAILED'}"
        )
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                error = event.step_failure_data.error
                # The first error that is not one of Dagster's wrappers: the project's own,
                # which says what to fix (not the library error it was raised from).
                while error.cause is not None and error.cls_name.startswith("Dagster"):
                    error = error.cause
                print(f"\n{event.step_key} failed: {error.cls_name}: {error.message.strip()}")


def cmd_migrate(_: argparse.Namespace) -> int:
    """`alembic upgrade head` on the configured database, from the package's own migrations
    (an installed wheel has no alembic configuration file to run `alembic` from)."""
    from retrieval_assets.lib.embedded_postgres import embedded_url
    from retrieval_assets.lib.postgres import reaching
    from retrieval_assets.lib.schema import current_revision, ensure_schema
    from retrieval_assets.lib.settings import data_dir, is_set

    url = os.environ["DATABASE_URL"] if is_set("DATABASE_URL") else embedded_url(data_dir())
    with reaching(url):
        before = current_revision(url)
        ensure_schema(url, upgrade=True)
    print(f"schema: {before or '(none)'} -> {current_revision(url)}")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    with _resources("postgres", "lancedb") as resources:
        return _status(resources.postgres, resources.lancedb)


def _status(postgres: Any, lancedb: Any) -> int:
    from retrieval_assets.lib.connection import one

    with postgres.get_connection() as conn:
        conversations = one(conn, "SELECT count(*) FROM conversations")[0]
        chunks, missing = one(
            conn,
            "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL) FROM conversation_chunks",
        )
    print(
        f"postgres: {conversations} conversations, {chunks} chunks, "
        f"{missing} without a Titan vector"
    )
    with lancedb.get_connection() as db:
        table = lancedb.existing_chunks_table(db)
        rows = 0 if table is None else table.count_rows()
        print(f"lancedb:  {rows} chunks at {lancedb.location}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval_assets.lib.columns import COARSE, FINE
    from retrieval_assets.lib.search import postgres_search, search
    from retrieval_assets.lib.search_snapshot import current

    hits: list[Any]
    if args.store == "postgres":
        with _resources("postgres", "titan_model") as resources:
            with resources.postgres.get_connection() as conn:
                hits = postgres_search(
                    conn,
                    resources.titan_model,
                    args.query,
                    k=args.k,
                    user=args.user,
                    tier=args.tier,
                    mode=args.mode,
                )
    else:
        with (
            _resources("lancedb", "coarse_model", "fine_model") as resources,
            resources.lancedb.get_connection() as db,
        ):
            table = resources.lancedb.existing_chunks_table(db)
            # Before the graph has run: say so now, not after loading the models.
            needed = () if args.mode == "lexical" else (COARSE.column, FINE.column)
            missing = (
                ["chunks"] if table is None else [c for c in needed if c not in table.schema.names]
            )
            if missing:
                print(
                    f"nothing to search yet: LanceDB at {resources.lancedb.location} has no "
                    f"{' or '.join(missing)} (run `retrieval-assets run` first)",
                    file=sys.stderr,
                )
                return 1
            hits = search(
                table,
                resources.coarse_model,
                resources.fine_model,
                args.query,
                k=args.k,
                user=args.user,
                snapshot=current(resources.lancedb.snapshot_root),
                mode=args.mode,
            )
    if not hits:
        scope = "".join(
            f" {name} {value!r}" for name, value in (("of user", args.user), ("in tier", args.tier))
            if value
        )  # fmt: skip
        print(
            f"no results: no chunk{scope} matched in {args.store} "
            "(`retrieval-assets status` shows what each store holds)"
        )
        return 1
    for rank, hit in enumerate(hits, 1):
        parts = [hit.how if hit.model is None else f"{hit.how}: {hit.model}"]
        if hit.how == "hybrid":
            parts += [
                "dense " + ("-" if hit.dense is None else f"{hit.dense:.3f}"),
                "lexical " + ("-" if hit.lexical is None else f"{hit.lexical:.2f}"),
            ]
        when = f"  {hit.created_at:%Y-%m-%d}" if hit.created_at else ""
        print(
            f"{rank:>2}. {hit.score:.3f} ({'; '.join(parts)})  {'/'.join(hit.roles)}  "
            f"conversation {hit.conversation_id} turns {hit.turn_start}-{hit.turn_end}  "
            f"user {hit.user_id}{when}"
        )
        text = " ".join(hit.content.split())
        print(f"    {text[:160]}{'…' if len(text) > 160 else ''}")
    return 0


def cmd_replay_quarantine(_: argparse.Namespace) -> int:
    from retrieval_assets.lib.titan import replay_quarantine

    with _resources("postgres") as resources, resources.postgres.get_connection() as conn:
        released = replay_quarantine(conn)
    print(f"released {released} quarantined chunks; the next titan_vectors run retries them")
    return 0


def cmd_titan_dims(args: argparse.Namespace) -> int:
    from retrieval_assets.lib.schema import validate_titan_dimensions

    new = validate_titan_dimensions(args.dims)
    with _resources("postgres") as resources:
        return _titan_dims(resources.postgres, new)


def _titan_dims(postgres: Any, new: int) -> int:
    from retrieval_assets.lib.schema import (
        EMBEDDING_TYPE,
        embedding_dims,
        ensure_schema,
        write_titan_dims_revision,
    )

    with postgres.get_connection() as conn:
        old = embedding_dims(conn)
    if old == new:
        print(f"conversation_chunks.embedding is already {EMBEDDING_TYPE}({new}); nothing to do")
        return 0
    path = write_titan_dims_revision(old, new)
    print(f"wrote {path}: {EMBEDDING_TYPE}({old}) -> {EMBEDDING_TYPE}({new}); commit it")
    if postgres.embedded:
        ensure_schema(postgres.url, upgrade=True)
        print(
            "applied to the embedded database; set TITAN_DIMENSIONS="
            f"{new} so the Bedrock resource asks Titan for {new} dimensions"
        )
    else:
        print("apply with `alembic upgrade head` (or `--sql` for the Supabase SQL editor)")
    return 0


@contextmanager
def _holding_postgres(args: argparse.Namespace) -> Iterator[None]:
    """Commands that use the embedded PostgreSQL hold it while they run (the steps of a run and
    the UI's runs only attach), and the last holder stops it: no start per step, and nothing
    left running after the command."""
    from retrieval_assets.lib.settings import data_dir, is_set

    uses_postgres = args.fn is not cmd_search or args.store == "postgres"
    if is_set("DATABASE_URL") or not uses_postgres or not getattr(args, "holds_postgres", True):
        yield
        return
    from retrieval_assets.lib.embedded_postgres import hold_embedded

    with hold_embedded(data_dir()):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="retrieval-assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="materialize the whole graph").set_defaults(fn=cmd_run)
    sub.add_parser("status", help="store counts and NULL backlog").set_defaults(fn=cmd_status)
    sub.add_parser(
        "stop-db", help="stop the embedded PostgreSQL (e.g. left running after a crash)"
    ).set_defaults(fn=cmd_stop_db, holds_postgres=False)
    sub.add_parser(
        "ui",
        help="the Dagster web UI and daemon (dagster dev; its options pass through)",
        add_help=False,  # -h is dagster dev's --host
    ).set_defaults(fn=cmd_ui)
    find = sub.add_parser("search", help="search the chunks: hybrid, dense or lexical")
    find.add_argument("query")
    find.add_argument("-k", type=int, default=5, help="results to show (default 5)")
    find.add_argument("--user", help="only this user's chunks")
    find.add_argument(
        "--store",
        choices=["lancedb", "postgres"],
        default="lancedb",
        help="lancedb: LanceDB's full-text index and FastEmbed top-100 reranked by "
        "sentence-transformers; postgres: the match RPCs (BM25 over the tsvector column, Titan "
        "vectors)",
    )
    find.add_argument(
        "--mode",
        choices=["hybrid", "dense", "lexical"],
        default="hybrid",
        help="hybrid (default): BM25 and dense fused; dense: vectors only; lexical: BM25 only",
    )
    find.add_argument("--tier", help="postgres only: one chunk tier")
    find.set_defaults(fn=cmd_search)
    sub.add_parser("replay-quarantine", help="retry the chunks Titan kept failing on").set_defaults(
        fn=cmd_replay_quarantine
    )
    sub.add_parser("migrate", help="bring the database's schema to head").set_defaults(
        fn=cmd_migrate
    )
    worker = sub.add_parser("worker", help="a celery worker for the steps (CELERY_BROKER_URL)")
    worker.add_argument(
        "--concurrency", type=int, default=1, help="steps at once (each model uses every core)"
    )
    worker.add_argument("--name", default="retrieval", help="the worker's name (name@host)")
    worker.set_defaults(fn=cmd_worker, precheck=_needs_broker)
    dims = sub.add_parser("titan-dims", help="migrate the Titan vector column to N dimensions")
    dims.add_argument("dims", help="256, 512 or 1024")
    dims.set_defaults(fn=cmd_titan_dims)
    args, extra = parser.parse_known_args(argv)
    if extra and args.fn is not cmd_ui:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.dagster_args = extra
    from retrieval_assets.lib.settings import ConfigError, check_environment

    try:
        check_environment()  # before any work: a bad variable fails here, naming itself
        if hasattr(args, "precheck"):  # what the command needs, before it starts a server
            args.precheck()
        with _holding_postgres(args):
            return args.fn(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`search ... | head -3`): stop as a Unix tool killed by SIGPIPE does,
        # quietly; stdout goes to /dev/null so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        # Resources set up through Dagster arrive wrapped in its errors: show the project's own
        # (which names the variable and the fix), not the wrapper and its traceback.
        while type(exc).__module__.startswith("dagster") and exc.__cause__ is not None:
            exc = exc.__cause__  # type: ignore[assignment]
        if not isinstance(exc, ValueError | RuntimeError | OSError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The `retrieval-assets` command: main(), then an exit without the interpreter's teardown
    (an exception leaves through the normal path, with its traceback)."""
    exit_without_teardown(main())


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with `code` after the exit handlers and the output, skipping the teardown.

    A process that imported Dagster, LanceDB and the models spent over 3 s after its work was
    done in Py_FinalizeEx's garbage collection of modules about to vanish anyway (seen with gdb),
    on every command. The exit handlers still run first (logging, multiprocessing, weakref
    finalizers such as temporary directories), and the output is flushed."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, or a closed stream: nothing to keep
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
