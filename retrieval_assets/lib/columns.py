"""Vector columns, each declared once: which store holds it, under what name, for which role,
made by which model resource, in which concurrency pool.

Everything Dagster shows of a column (its asset, shard backfill job, backlog sensor and checks) is
made from its declaration (defs/vectors/), and the store named here does the work through the
same verbs in both stores (lib/stores/). Adding a column is one more declaration in
VECTOR_COLUMNS; a role names the column, its resource, job and sensor, never the library behind
it. Two models never share a column: the store records which model filled each one and remakes a
column whose configured model changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

# Steps that run a local model over the corpus share one pool, limit 1 by default (dagster.yaml):
# on CPU each model's thread pool already takes every core, and two fills at once also collide on
# the same table (each skips the rows the other rewrote meanwhile, and redoes them later).
LOCAL_MODELS_POOL = "local_models"
BEDROCK_POOL = "bedrock"  # Bedrock calls, capped by the account's quota (dagster.yaml)


@dataclass(frozen=True)
class VectorColumn:
    role: str  # names the asset (<role>_vectors), job (<role>_backfill), sensor and column
    store: str  # "lancedb" or "postgres": which store package (lib/stores/) serves it
    column: str  # the column's name in that store
    model_resource: str  # the resource key of the embedder that fills it
    pool: str
    kinds: tuple[str, ...]
    description: str
    # Earlier names of the column: a store still using one is renamed in place, vectors kept.
    formerly: tuple[str, ...] = ()

    @property
    def asset_name(self) -> str:
        return f"{self.role}_vectors"

    @property
    def job_name(self) -> str:
        return f"{self.role}_backfill"

    @property
    def sensor_name(self) -> str:
        return f"{self.role}_backlog_sensor"


COARSE = VectorColumn(
    role="coarse",
    store="lancedb",
    column="vector_coarse",
    model_resource="coarse_model",
    pool=LOCAL_MODELS_POOL,
    kinds=("lancedb", "onnx"),
    description="Coarse vectors of each chunk (FastEmbed, ONNX): the space the ANN index and the "
    "search snapshot narrow a large history with. Only rows whose vector is NULL are embedded.",
    formerly=("vector_fastembed",),
)
FINE = VectorColumn(
    role="fine",
    store="lancedb",
    column="vector_fine",
    model_resource="fine_model",
    pool=LOCAL_MODELS_POOL,
    kinds=("lancedb", "pytorch"),
    description="Fine vectors of each chunk (sentence-transformers): the space that reranks the "
    "coarse candidates. Only rows whose vector is NULL are embedded.",
    formerly=("vector",),
)
TITAN = VectorColumn(
    role="titan",
    store="postgres",
    # The match RPCs that Supabase clients call read this column: its name is their contract.
    column="embedding",
    model_resource="titan_model",
    pool=BEDROCK_POOL,
    kinds=("postgres", "bedrock"),
    description="Titan Text Embeddings v2 vectors of each chunk (conversation_chunks.embedding, "
    "halfvec), the production search path behind the match_conversation_chunks RPCs. Each row "
    "records what made it: Amazon Bedrock, or the local Bedrock endpoint when no AWS "
    "credentials are configured.",
)
VECTOR_COLUMNS = (COARSE, FINE, TITAN)


# ----------------------------------------------------------------------- what a store reports


def fingerprint(count: int, first: str, last: str) -> str:
    return hashlib.sha256(f"{count}:{first}:{last}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Backlog:
    """The rows of a column still waiting for a vector, per hash shard: a count and a
    fingerprint of their ids. The fingerprint names one backlog, so a sensor that ticks again over
    the same rows derives the same run key and launches nothing new. A column made by another
    model than the configured one is stale as a whole: its asset remakes it, never shard by shard.
    """

    column: str
    rows: int = 0
    shards: dict[str, tuple[int, str]] = field(default_factory=dict)  # shard -> (rows, print)
    stale: str | None = None  # why the whole column must be remade by its asset

    @property
    def empty(self) -> bool:
        return self.rows == 0 and self.stale is None


@dataclass(frozen=True)
class CheckSpec:
    """A store-level check every column of a store has (declared before anything connects)."""

    name: str
    description: str
    warn: bool = False  # a soft check: WARN, not ERROR


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    metadata: dict[str, Any]


class ColumnNotMigrated(RuntimeError):
    """A shard fill met a column not yet remade for its configured model (its asset does that
    over the whole column)."""


class ColumnStore(Protocol):
    """The verbs every store implements for its vector columns (lib/stores/)."""

    resource_keys: frozenset[str]  # the resources besides the model it is built from
    checks: tuple[CheckSpec, ...]

    def ensure(self, column: VectorColumn, embedder: Any, log: Any) -> str:
        """Make the column hold `embedder`'s vectors: created | migrated | renamed | unchanged."""
        ...

    def backlog(self, column: VectorColumn, embedder: Any) -> Backlog: ...

    def fill(
        self, column: VectorColumn, embedder: Any, shard: str | None, log: Any
    ) -> dict[str, Any]:
        """Embed the column's pending rows (of one shard, or all); the run's figures."""
        ...

    def check(self, column: VectorColumn, embedder: Any) -> list[CheckOutcome]: ...
