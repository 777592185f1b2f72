"""Shared fixtures: one real embedded PostgreSQL+pgvector per session, a LanceDB dir per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval_assets.defs.vectors.columns import ALL_SHARDS, column_definitions
from retrieval_assets.lib.chunking import ChunkerResource
from retrieval_assets.lib.columns import COARSE, FINE, LOCAL_MODELS_POOL, TITAN, VectorColumn
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.embedded_postgres import hold_embedded, stop_embedded
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.models import MINILM
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import ensure_schema
from retrieval_assets.lib.sources import ConversationSourceResource
from tests.services import ObjectStore, s3_server


def pytest_configure(config: pytest.Config) -> None:
    """The suite's own runs (CLI subprocesses included) use MiniLM as the fine model: they test
    behaviour, not quality, and it is 5x faster than the default all-mpnet-base-v2, which
    tests/test_packaging.py runs end to end (and ./dev bench -k quality measures)."""
    import os

    os.environ.setdefault("ST_MODEL", MINILM)


# The longest test files, longest first (measured with --durations on this 2-core machine, two
# workers: the UI test 380 s, the wheel's five runs ~300 s, the production deployment 270 s, the
# others 80-260 s). ./dev test hands whole files to parallel workers in this order: a long file
# started last would finish alone. Any other file keeps its place after these.
LONGEST_FIRST = (
    "tests/e2e/test_ui.py",
    "tests/test_packaging.py",
    "tests/test_settings.py",
    "tests/defs/test_local_embeddings.py",
    "tests/faults/test_faults.py",
    "tests/test_celery.py",
    "tests/defs/test_backfills.py",
    "tests/defs/test_search_modes.py",
    "tests/defs/test_titan.py",
    "tests/lib/test_postgres.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def _processes_of(root: Path) -> list:
    """Processes this session started (its descendants) or that work under its temp root (an
    embedded server detaches from whoever started it): any still running."""
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    # This process and what started it (a `timeout` wrapper naming --basetemp) are not left over.
    mine = {me.pid, *(p.pid for p in me.parents())}
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        # the command line (a server's data directory), or the environment (a dagster dev whose
        # parent died: DAGSTER_HOME and RETRIEVAL_DATA_DIR point into the session)
        mentions = [*(process.info["cmdline"] or ()), *(process.info["environ"] or {}).values()]
        if process.pid not in mine and any(str(root) in m for m in mentions):
            found[process.pid] = process
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# Each vector column's definitions, made from its declaration as defs/vectors/ makes them. A run
# that materializes a vector asset whole carries ALL_SHARDS as its tags.
COARSE_DEFS, FINE_DEFS, TITAN_DEFS = (column_definitions(c) for c in (COARSE, FINE, TITAN))
coarse_vectors, fine_vectors, titan_vectors = (
    next(iter(d.assets or [])) for d in (COARSE_DEFS, FINE_DEFS, TITAN_DEFS)
)
__all__ = ["ALL_SHARDS"]
# A throwaway column: declared, nothing else (filled by the coarse model).
EXTRA = VectorColumn(
    role="extra",
    store="lancedb",
    column="vector_extra",
    model_resource="coarse_model",
    pool=LOCAL_MODELS_POOL,
    kinds=("lancedb", "onnx"),
    description="A throwaway column: declared, nothing else.",
)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, pass or fail, no server or other process it started is left running.
    Set up first, so it is checked last (after pg_url and every other fixture let go)."""
    import time

    root = tmp_path_factory.getbasetemp()
    yield
    deadline = time.monotonic() + 30  # a server stopping, a process group winding down
    while (left := _processes_of(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = [f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in left]
    for pgdata in {Path(a) for p in left for a in p.cmdline() if a.endswith("/pg")}:
        stop_embedded(pgdata.parent)  # clean up anyway, so one failure does not pile up
    for process in _processes_of(root):
        process.kill()
    assert not described, "left running after the session:\n" + "\n".join(described)


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL with pgvector, migrated to head, held for the whole session."""
    with hold_embedded(tmp_path_factory.mktemp("pg-session")) as url:
        ensure_schema(url, upgrade=True)
        yield url


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """An S3-compatible server (moto) on loopback for the session; each user takes its own
    LanceDB URI in its bucket."""
    with s3_server(tmp_path_factory.mktemp("s3")) as store:
        yield store


@pytest.fixture
def db(pg_url: str) -> str:
    """The session database, emptied of data (the schema stays)."""
    return emptied(pg_url)


def emptied(pg_url: str) -> str:
    with connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE conversations, conversation_chunks, chunk_lexicon, chunk_lexicon_stats "
            "CASCADE"
        )
        # each test gets a new LanceDB directory, so no LanceDB column is recorded yet
        conn.execute("DELETE FROM embedding_schema_versions WHERE store = 'lancedb'")
    return pg_url


@pytest.fixture
def lance_uri(tmp_path: Path) -> str:
    return str(tmp_path / "lancedb")


@pytest.fixture(scope="session")
def chunker_resource() -> ChunkerResource:
    return ChunkerResource()


@pytest.fixture
def make_resources(db: str, lance_uri: str, chunker_resource: ChunkerResource):
    """Resources bound to the test stores, reading conversations from `source`."""

    def build(source: Path | str, **source_options) -> dict:
        return store_resources(db, lance_uri, chunker_resource, source, **source_options)

    return build


def store_resources(
    db: str, lance_uri: str, chunker: ChunkerResource, source: Path | str, **source_options
) -> dict:
    return {
        "postgres": PostgresResource(database_url=db),
        "lancedb": LanceDBResource(uri=lance_uri),
        "conversation_source": ConversationSourceResource(path=str(source), **source_options),
        "chunker": chunker,
    }


@pytest.fixture(scope="session")
def fastembed(tmp_path_factory: pytest.TempPathFactory):
    """The real FastEmbed model (the packaged MiniLM, exported to ONNX once per session)."""
    from retrieval_assets.lib.embedders import FastEmbedResource

    resource = FastEmbedResource(data_dir=str(tmp_path_factory.mktemp("models")))
    resource.load()
    return resource


@pytest.fixture(scope="session")
def sentence_transformer():
    from retrieval_assets.lib.embedders import SentenceTransformerResource

    # MiniLM, not the default mpnet: the tests ask behaviour, not quality, and MiniLM is 5x faster.
    # Queries reuse FastEmbed's ONNX export of the same network (one per machine).
    resource = SentenceTransformerResource(model=MINILM)
    resource.load()
    return resource


@pytest.fixture
def make_graph_resources(make_resources, fastembed, sentence_transformer):
    """make_resources plus the embedding models."""

    def build(source, **source_options) -> dict:
        return with_models(
            make_resources(source, **source_options), fastembed, sentence_transformer
        )

    return build


def with_models(resources: dict, fastembed, sentence_transformer) -> dict:
    return {**resources, "coarse_model": fastembed, "fine_model": sentence_transformer}


def real_sentences(limit: int) -> list[str]:
    """Real English sentences: the docstrings of the standard library (no generated filler)."""
    import importlib
    import inspect
    import re

    modules = [
        "argparse",
        "json",
        "collections",
        "functools",
        "itertools",
        "pathlib",
        "shutil",
        "subprocess",
        "threading",
        "asyncio",
        "email",
        "http.client",
        "logging",
        "unittest",
        "sqlite3",
        "decimal",
        "datetime",
        "textwrap",
        "typing",
        "csv",
        "zipfile",
    ]
    sentences: list[str] = []
    seen: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 30 <= len(sentence) <= 300 and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
                    if len(sentences) >= limit:
                        return sentences
    return sentences


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("bedrock-models"))


@pytest.fixture
def make_bedrock(model_dir):
    """A BedrockResource on the local endpoint (real boto3 client, real HTTP), stopped after."""
    made = []

    def build(**options):
        resource = local_bedrock(model_dir, **options)
        made.append(resource)
        return resource

    yield build
    for resource in made:
        resource.teardown_after_execution(None)


def local_bedrock(model_dir: str, **options):
    """The local endpoint's resource; its user stops it (teardown_after_execution)."""
    from retrieval_assets.lib.bedrock import BedrockResource

    # MiniLM stands in for Titan here (the default's mpnet is slower; the tests ask no quality).
    options.setdefault("local_model", MINILM)
    return BedrockResource(use_local_endpoint=True, data_dir=model_dir, **options)


def write_jsonl_source(directory: Path, conversations: range) -> Path:
    """A JSONL export of real text: conversation i is two turns by user-(i % 20)."""
    import json

    sentences = real_sentences(1_200)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "messages.jsonl").open("w") as out:
        for i in conversations:
            for turn, role in enumerate(("user", "assistant")):
                record = {
                    "conversation_id": f"conv-{i:05d}",
                    "user_id": f"user-{i % 20}",
                    "role": role,
                    "content": sentences[(2 * i + turn) % len(sentences)],
                    "created_at": 1_700_000_000 + i,
                }
                out.write(json.dumps(record) + "\n")
    return directory
