"""LanceDB on object storage (an S3-compatible server on loopback): what makes concurrent writers
safe there, and that it holds for two processes committing to one table at once.

LanceDB 0.40 commits a table version by writing its manifest with a conditional put
(If-None-Match: *): of two writers racing for the same version one gets 412 Precondition Failed,
re-reads and retries on the next version. It has no other way to commit on S3 (with conditional
puts disabled it refuses to write), so the store must honour If-None-Match: AWS S3 does since
2024, as do MinIO, R2 and moto. The whole graph on S3 runs in tests/test_settings.py (the
production deployment); racing and killed vector fills on S3 in tests/faults/test_faults.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from retrieval_assets.lib.lancedb_store import LanceDBResource
from tests.services import ObjectStore

COMMITS = 30
ROWS = 10

WRITER = """
import sys
import pyarrow as pa
from retrieval_assets.lib.lancedb_store import LanceDBResource

uri, options, who, commits, rows = sys.argv[1:6]
with LanceDBResource(uri=uri, storage_options=options).get_connection() as db:
    table = db.open_table("t")
    print("ready", flush=True)
    sys.stdin.readline()  # both start committing together
    for i in range(int(commits)):
        table.add(pa.table({"writer": [who] * int(rows), "n": [i] * int(rows)}))
print("done", flush=True)
"""


def test_the_server_refuses_a_second_conditional_put(object_store: ObjectStore):
    client = object_store.client()
    key = "probe/manifest"
    client.put_object(Bucket=object_store.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=object_store.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    body = client.get_object(Bucket=object_store.bucket, Key=key)["Body"].read()
    assert body == b"first"


def test_two_processes_commit_to_one_table_on_s3_and_lose_nothing(object_store: ObjectStore):
    import pyarrow as pa

    lancedb = LanceDBResource(
        uri=object_store.uri("concurrent"), storage_options=object_store.storage_options
    )
    with lancedb.get_connection() as db:
        db.create_table("t", schema=pa.schema([("writer", pa.string()), ("n", pa.int64())]))
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                lancedb.uri,
                lancedb.storage_options,
                who,
                str(COMMITS),
                str(ROWS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()[-2000:]
        for writer in writers:
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outputs = [writer.communicate(timeout=300) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    for writer, (out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0 and out.strip() == "done", err[-3000:]
    with lancedb.get_connection() as db:
        table = db.open_table("t")
        # every commit of both landed, each once: no version overwritten by the other writer
        assert table.version == 1 + 2 * COMMITS
        for who in ("a", "b"):
            counts = table.search().where(f"writer = '{who}'").select(["n"]).limit(None)
            ns = sorted(counts.to_arrow().column("n").to_pylist())
            assert ns == sorted(list(range(COMMITS)) * ROWS)
