"""Ownership and deletion: no export changes another user's conversation, a second source never
takes one over, and only a complete read deletes (declined records keep their stored version)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import dagster as dg
import lancedb
import psycopg

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE
from tests.defs.test_conversations import checks, metadata
from tests.test_security import supabase_like  # noqa: F401 - the fixture

ASSETS = [conversations, conversation_chunks]


def jsonl_export(path: Path, user: str, conversations_: dict[str, list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for conv_id, texts in conversations_.items():
            for i, text in enumerate(texts):
                role = "user" if i % 2 == 0 else "assistant"
                line = {"conversation_id": conv_id, "user_id": user, "role": role, "content": text}
                out.write(json.dumps(line) + "\n")
    return path


def stored(url: str) -> dict[tuple[str, str], list[str]]:
    """(user, export id) -> the stored chunk texts, from Postgres."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT c.user_id, c.external_id, k.content FROM conversations c "
            "JOIN conversation_chunks k ON k.conversation_id = c.id ORDER BY k.content"
        ).fetchall()
    out: dict[tuple[str, str], list[str]] = {}
    for user, external_id, content in rows:
        out.setdefault((user, external_id), []).append(content)
    return out


def lance_users(lance_uri: str) -> dict[str, set[str]]:
    table = lancedb.connect(lance_uri).open_table(CHUNKS_TABLE).to_arrow()
    out: dict[str, set[str]] = {}
    for user, content in zip(
        table.column("user_id").to_pylist(), table.column("content").to_pylist(), strict=True
    ):
        out.setdefault(user, set()).add(content)
    return out


def run(resources: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize(ASSETS, resources=resources)


def test_two_users_reusing_one_id_keep_both_conversations_in_both_stores(
    make_resources, db, lance_uri, tmp_path
):
    alice = jsonl_export(tmp_path / "alice" / "export.jsonl", "alice", {"1": ["alice's secret"]})
    bob = jsonl_export(tmp_path / "bob" / "export.jsonl", "bob", {"1": ["bob's attempt"]})
    run(make_resources(alice))
    result = run(make_resources(bob))  # another source, another user, the same id
    meta = metadata(result, "postgres/conversations")
    assert (meta["inserted"], meta["updated"], meta["collisions"]) == (1, 0, 0)
    assert stored(db) == {
        ("alice", "1"): ["user: alice's secret"],
        ("bob", "1"): ["user: bob's attempt"],
    }
    assert lance_users(lance_uri) == {
        "alice": {"user: alice's secret"},
        "bob": {"user: bob's attempt"},
    }
    # Both in one source, one file each: both land too (they used to be "duplicates").
    both = tmp_path / "both"
    jsonl_export(both / "a.jsonl", "alice", {"1": ["alice's secret"]})
    jsonl_export(both / "b.jsonl", "bob", {"1": ["bob's attempt"]})
    run(make_resources(both))
    assert set(stored(db)) == {("alice", "1"), ("bob", "1")}


def test_under_supabase_rls_each_user_reads_only_their_conversation(
    supabase_like,  # noqa: F811 - the fixture
    tmp_path,
    lance_uri,
    chunker_resource,
):
    from retrieval_assets.lib.lancedb_store import LanceDBResource
    from retrieval_assets.lib.postgres import PostgresResource
    from retrieval_assets.lib.sources import ConversationSourceResource

    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    for user, text in ((alice, "alice's secret"), (bob, "bob's attempt")):
        source = jsonl_export(tmp_path / user / "e.jsonl", user, {"shared-id": [text]})
        run(
            {
                "postgres": PostgresResource(database_url=supabase_like),
                "lancedb": LanceDBResource(uri=lance_uri),
                "conversation_source": ConversationSourceResource(path=str(source)),
                "chunker": chunker_resource,
            }
        )
    with psycopg.connect(supabase_like, autocommit=True) as conn:
        for user, text in ((alice, "alice's secret"), (bob, "bob's attempt")):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE authenticated")
                conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", [user])
                owned = conn.execute(
                    "SELECT c.user_id, c.external_id, k.content FROM conversations c "
                    "JOIN conversation_chunks k ON k.conversation_id = c.id"
                ).fetchall()
            assert owned == [(user, "shared-id", f"user: {text}")]


def test_a_second_source_never_overwrites_a_conversation(make_resources, db, tmp_path):
    first = jsonl_export(tmp_path / "one" / "e.jsonl", "u", {"c": ["the original"]})
    run(make_resources(first))
    other = jsonl_export(tmp_path / "two" / "e.jsonl", "u", {"c": ["a different text"]})
    result = run(make_resources(other))
    meta = metadata(result, "postgres/conversations")
    assert (meta["inserted"], meta["updated"], meta["collisions"]) == (0, 0, 1)
    assert str(tmp_path / "one" / "e.jsonl") in meta_text(result)  # names the stored source
    assert checks(result)["source_records_accepted"] is False  # a warning, not a failure
    assert checks(result)["source_read_completely"] is True
    assert stored(db) == {("u", "c"): ["user: the original"]}
    # The same text under another file name is the same conversation: moved, not changed.
    renamed = jsonl_export(tmp_path / "one" / "renamed.jsonl", "u", {"c": ["the original"]})
    meta = metadata(run(make_resources(renamed)), "postgres/conversations")
    assert (meta["inserted"], meta["updated"], meta["moved"], meta["deleted"]) == (0, 0, 1, 0)


def meta_text(result: dg.ExecuteInProcessResult) -> str:
    [check] = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "source_records_accepted"
    ]
    return check.metadata["collided"].value


def test_declined_records_keep_their_version_and_deletions_still_propagate(
    make_resources, db, tmp_path
):
    source = tmp_path / "export.json"

    def write(records):
        source.write_text(json.dumps(records))

    def sharegpt(conv_id, *texts):
        return {"id": conv_id, "conversations": [{"from": "human", "value": t} for t in texts]}

    write([sharegpt("keep", "kept"), sharegpt("declined", "was fine"), sharegpt("goes", "bye")])
    run(make_resources(source))
    # "declined" is now empty (declined, its id readable); "goes" vanished.
    write([sharegpt("keep", "kept"), sharegpt("declined")])
    result = run(make_resources(source))
    meta = metadata(result, "postgres/conversations")
    assert meta["deletions_propagated"] is True and meta["deleted"] == 1
    assert meta["held_back"] == 1 and meta["rejected_records"] == 1
    assert checks(result)["source_read_completely"] is True
    assert checks(result)["source_records_accepted"] is False
    assert set(stored(db)) == {("local-user", "keep"), ("local-user", "declined")}


def unprivileged(db_url: str) -> list[str]:
    """As root (which reads anything), run as the user owning the database's socket directory:
    a real non-root user who can still reach the embedded server."""
    if os.geteuid() != 0:
        return []
    socket_dir = Path(db_url.split("host=", 1)[1].split("&", 1)[0])
    return ["setpriv", f"--reuid={socket_dir.owner()}", f"--regid={socket_dir.group()}",
            "--clear-groups"]  # fmt: skip


MATERIALIZE_IN_CHILD = """
import json, sys
import dagster as dg
from retrieval_assets.defs.conversations.assets import conversations
from retrieval_assets.lib.sources import ConversationSourceResource
from retrieval_assets.lib.postgres import PostgresResource
result = dg.materialize([conversations], resources={
    "postgres": PostgresResource(database_url=sys.argv[1]),
    "conversation_source": ConversationSourceResource(path=sys.argv[2])})
[check] = [c for c in result.get_asset_check_evaluations()
           if c.check_name == "source_read_completely"]
[mat] = result.get_asset_materialization_events()
meta = {k: v.value for k, v in mat.materialization.metadata.items()}
print(json.dumps({"passed": check.passed, "unreadable": check.metadata["unreadable"].value,
                  "deleted": meta["deleted"], "propagated": meta["deletions_propagated"]}))
"""


def test_an_unreadable_subdirectory_holds_deletions_back(make_resources, db, tmp_path):
    # Where the unprivileged child can reach it (pytest's tmp_path is private to root).
    shared = Path(tempfile.mkdtemp(prefix="ownership-"))
    shared.chmod(0o755)
    try:
        check_unreadable_subdirectory(make_resources, db, shared / "export")
    finally:
        (shared / "export" / "mounted").chmod(0o755)
        shutil.rmtree(shared)


def check_unreadable_subdirectory(make_resources, db, source: Path) -> None:
    jsonl_export(source / "open" / "a.jsonl", "u", {"a": ["readable"]})
    jsonl_export(source / "mounted" / "b.jsonl", "u", {"b": ["on a half-mounted volume"]})
    run(make_resources(source))
    assert set(stored(db)) == {("u", "a"), ("u", "b")}
    for part in (source, source / "open", source / "open" / "a.jsonl"):
        part.chmod(0o755 if part.is_dir() else 0o644)
    (source / "mounted").chmod(0)
    done = subprocess.run(
        [*unprivileged(db), sys.executable, "-c", MATERIALIZE_IN_CHILD, db, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "HOME": str(source.parent)},
    )
    (source / "mounted").chmod(0o755)
    # The first exception's lines, not the tail of Dagster's wrapper traceback.
    causes = [
        line for line in done.stderr.splitlines() if re.match(r"^\w[\w.]*(Error|Exception)", line)
    ]
    assert done.returncode == 0, "\n".join(causes) or done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "passed": False,
        "unreadable": str(source / "mounted"),
        "deleted": 0,
        "propagated": False,
    }
    assert set(stored(db)) == {("u", "a"), ("u", "b")}  # b was not deleted
