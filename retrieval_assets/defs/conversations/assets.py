"""Raw conversations from the source export, and their chunks in Postgres and LanceDB."""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import psycopg

from retrieval_assets.defs.checked import asset_spec, materializing, wanted
from retrieval_assets.lib.chunking import CHUNKER_VERSION, ChunkerResource
from retrieval_assets.lib.ingest import (
    ChunkSummary,
    Collision,
    ConversationSummary,
    chunk_count,
    chunk_summary,
    conversation_summary,
    ingest_conversations,
    mirror_chunks,
    rebuild_chunks,
    stored_fingerprint,
)
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.reporting import (
    arrow_column_schema,
    markdown_histogram,
    markdown_table,
    postgres_column_schema,
)
from retrieval_assets.lib.sources import ConversationSourceResource, ParseReport, Problem

CONVERSATIONS = dg.AssetKey(["postgres", "conversations"])
POSTGRES_CHUNKS = dg.AssetKey(["postgres", "conversation_chunks"])
LANCEDB_CHUNKS = dg.AssetKey(["lancedb", "conversation_chunks"])
GROUP = "conversations"
SOURCE_READ_CHECK = "source_read_completely"
RECORDS_ACCEPTED_CHECK = "source_records_accepted"
TOKEN_BUDGET_CHECK = "chunks_within_token_budget"
CHUNK_COUNTS_AGREE = "chunk_counts_agree"
_LOGGED_PROBLEMS = 50


def _problem_logger(context: dg.AssetExecutionContext):
    logged = 0

    def log(problem: Problem) -> None:
        nonlocal logged
        logged += 1
        if logged <= _LOGGED_PROBLEMS:
            log_fn = context.log.error if problem.severity == "error" else context.log.warning
            log_fn(f"{problem.severity}: {problem}")
        elif logged == _LOGGED_PROBLEMS + 1:
            context.log.warning("further problems are counted in the metadata, not logged")

    return log


@dg.asset(
    key=CONVERSATIONS,
    group_name=GROUP,
    kinds={"postgres", "python"},
    owners=["team:data-platform"],
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            SOURCE_READ_CHECK,
            asset=CONVERSATIONS,
            description="Every directory, file and archive under the source was read to its end "
            "(otherwise deletions are held back). Names the paths that could not be read.",
        ),
        dg.AssetCheckSpec(
            RECORDS_ACCEPTED_CHECK,
            asset=CONVERSATIONS,
            description="No record was declined whole and no conversation collided with another "
            "source's (warns; declined records keep their stored version).",
        ),
    ],
)
def conversations(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    conversation_source: ConversationSourceResource,
) -> dg.MaterializeResult:
    """Raw conversations as exported by the chat app: one row per conversation with its turns
    (role, text, time) in order, upserted by id. A conversation that vanished from a cleanly read
    source is deleted, and its chunks with it in every store.

    A source whose files, settings and reading code are as they were at the last complete,
    collision-free read, while the conversations stored from it are too, is not parsed again:
    that read's figures are repeated (a run with nothing new costs the same at any size)."""
    fingerprint = conversation_source.fingerprint()
    source = conversation_source.source_key
    with postgres.get_connection() as conn:
        last = fingerprint and _same_as_last_read(context, fingerprint, conn, source)
        if last:
            stored = conversation_summary(conn)
            context.log.info(
                f"source unchanged since the last complete read: not parsed; "
                f"{last['conversations_read'].value} conversations read then, "
                f"{stored.conversations} stored"
            )
            return dg.MaterializeResult(
                metadata={
                    **last,
                    **{k: 0 for k in ("inserted", "updated", "moved", "deleted")},
                    "unchanged": last["conversations_read"].value,
                    "source_parsed": False,
                    **_stored_metadata(conn, stored),
                },
                check_results=_source_checks(
                    unreadable=[],
                    rejected_records=int(last["rejected_records"].value),
                    rejected=int(last["rejected"].value),
                    held_back=0,
                    collisions=[],
                ),
            )
        report = ParseReport(on_problem=_problem_logger(context))
        result = ingest_conversations(
            conn,
            conversation_source.read(report),
            source=source,
            # An empty or partly unreadable read proves nothing about what was deleted.
            propagate_deletions=lambda: report.complete and report.conversations > 0,
            held_back=lambda: report.held_back,
        )
        stored = conversation_summary(conn)
        stored_metadata = _stored_metadata(conn, stored)
        after = stored_fingerprint(conn, source) if fingerprint else ""
    if report.conversations == 0 and (report.rejected or report.errors):
        raise dg.Failure(
            f"no conversation could be read from {conversation_source.path}",
            metadata={
                "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems))
            },
        )
    if result.deletions_skipped:
        context.log.warning(
            "deletions not propagated: the source was not read completely or yielded nothing"
            + (
                f" (unreadable: {', '.join(report.incomplete_files[:5])})"
                if report.incomplete_files
                else ""
            )
        )
    for collision in result.collisions[:_LOGGED_PROBLEMS]:
        context.log.warning(
            f"conversation {collision.external_id!r} of user {collision.user_id!r} at "
            f"{collision.origin} in {source} differs from the one "
            f"stored from {collision.stored_source}: kept as stored, not overwritten"
        )
    context.log.info(
        f"read {report.conversations} conversations ({report.turns} turns) from "
        f"{len(report.files)} file(s): {result.inserted} new, {result.updated} changed, "
        f"{result.moved} moved here from another source, {result.unchanged} unchanged, "
        f"{result.deleted} deleted, {report.rejected} rejected, "
        f"{len(result.collisions)} colliding with another source"
    )
    problems = "\n".join(f"- **{p.severity}** {p}" for p in report.problems) or "none"
    return dg.MaterializeResult(
        metadata={
            "source": conversation_source.path,
            "files": len(report.files),
            "records": report.records,
            "conversations_read": report.conversations,
            "turns_read": report.turns,
            "rejected": report.rejected,
            "rejected_records": report.rejected_records,
            "warnings": report.warnings,
            "errors": report.errors,
            "inserted": result.inserted,
            "updated": result.updated,
            "moved": result.moved,
            "collisions": len(result.collisions),
            "held_back": result.held_back,
            "unchanged": result.unchanged,
            "deleted": result.deleted,
            "deletions_propagated": not result.deletions_skipped,
            "problems": dg.MetadataValue.md(problems),
            "source_parsed": True,
            # What the next run compares (_same_as_last_read); empty: never skip a read.
            _SOURCE_FINGERPRINT: fingerprint or "",
            _STORED_FINGERPRINT: after,
            **stored_metadata,
        },
        check_results=_source_checks(
            unreadable=report.incomplete_files,
            rejected_records=report.rejected_records,
            rejected=report.rejected,
            held_back=result.held_back,
            collisions=result.collisions,
        ),
    )


_SOURCE_FINGERPRINT = "source_fingerprint"
_STORED_FINGERPRINT = "stored_fingerprint"
# The last read's figures a skipped read repeats in its checks and log.
_REPEATED_COUNTS = ("conversations_read", "rejected", "rejected_records")


def _same_as_last_read(
    context: dg.AssetExecutionContext, fingerprint: str, conn: psycopg.Connection, source: str
) -> dict[str, Any] | None:
    """The metadata of the last materialization when it read the same source (`fingerprint`)
    completely, with no collision or held-back record (their outcome depends on other sources),
    and the conversations stored from it are still as it left them; else None."""
    event = context.instance.get_latest_materialization_event(CONVERSATIONS)
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        return None
    last: dict[str, Any] = dict(materialization.metadata)

    def value(key: str) -> object:
        return last[key].value if key in last else None

    clean = (
        value("deletions_propagated") is True
        and value("collisions") == 0
        and value("held_back") == 0
        and all(isinstance(value(k), int) for k in _REPEATED_COUNTS)
        and value(_SOURCE_FINGERPRINT) == fingerprint
        and value(_STORED_FINGERPRINT) == stored_fingerprint(conn, source)
    )
    return last if clean else None


def _stored_metadata(conn: psycopg.Connection, stored: ConversationSummary) -> dict[str, Any]:
    return {
        "dagster/row_count": stored.conversations,
        "dagster/column_schema": postgres_column_schema(conn, "conversations"),
        "total_turns": stored.turns,
        "preview": dg.MetadataValue.md(
            markdown_table(["id", "user", "format", "turns", "title"], stored.latest)
        ),
    }


def _source_checks(
    *,
    unreadable: list[str],
    rejected_records: int,
    rejected: int,
    held_back: int,
    collisions: list[Collision],
) -> list[dg.AssetCheckResult]:
    collided = "\n".join(
        f"- user {c.user_id!r}, id {c.external_id!r}: stored from {c.stored_source}"
        for c in collisions[:_LOGGED_PROBLEMS]
    )
    return [
        dg.AssetCheckResult(
            check_name=SOURCE_READ_CHECK,
            passed=not unreadable,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "unreadable_paths": len(unreadable),
                "unreadable": ", ".join(unreadable[:20]) or "none",
            },
        ),
        dg.AssetCheckResult(
            check_name=RECORDS_ACCEPTED_CHECK,
            passed=not rejected_records and not collisions,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "rejected_records": rejected_records,
                "rejected_messages": rejected - rejected_records,
                "collisions": len(collisions),
                "held_back": held_back,
                "collided": dg.MetadataValue.md(collided or "none"),
            },
        ),
    ]


@dg.multi_asset(
    specs=[
        asset_spec(
            POSTGRES_CHUNKS,
            deps=[CONVERSATIONS],
            group_name=GROUP,
            kinds={"postgres"},
            code_version=f"chunker-v{CHUNKER_VERSION}",
            description="Turn-aware chunks of every conversation, sized in tokens of the "
            "embedding model's tokenizer, with speaker roles, turn span and tier; the Titan "
            "vector column starts NULL.",
        ),
        asset_spec(
            LANCEDB_CHUNKS,
            deps=[POSTGRES_CHUNKS],
            group_name=GROUP,
            kinds={"lancedb"},
            code_version=f"chunker-v{CHUNKER_VERSION}",
            description="The same chunks in LanceDB, where the FastEmbed and "
            "sentence-transformers vector columns live; kept equal to Postgres by chunk id.",
        ),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            TOKEN_BUDGET_CHECK,
            asset=POSTGRES_CHUNKS,
            description="No chunk holds more tokens than its tier allows.",
        ),
        dg.AssetCheckSpec(
            CHUNK_COUNTS_AGREE,
            asset=LANCEDB_CHUNKS,
            description="LanceDB holds as many chunks as Postgres (the mirror is complete).",
        ),
    ],
    # Either store's chunks alone (re-chunk in Postgres; mirror into LanceDB), or only the checks
    # (the nightly job: see defs/checked.py).
    can_subset=True,
)
def conversation_chunks(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    chunker: ChunkerResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Chunks only the conversations that changed since their last chunking, then mirrors."""
    budgets = {t.name: t.max_tokens for t in chunker.chunker.tiers}
    with postgres.get_connection() as conn:
        summary = None
        if materializing(context, POSTGRES_CHUNKS):
            materialized, summary = _rechunk(context, conn, chunker, budgets)
            yield materialized
        if wanted(context, POSTGRES_CHUNKS, TOKEN_BUDGET_CHECK):
            if summary is None:  # only the check: the summary was not made by a re-chunk
                summary = chunk_summary(conn, budgets)
            yield dg.AssetCheckResult(
                asset_key=POSTGRES_CHUNKS,
                check_name=TOKEN_BUDGET_CHECK,
                passed=summary.over_budget == 0,
                metadata={"chunks_over_budget": summary.over_budget},
            )
        with lancedb.get_connection() as db:
            table = lancedb.chunks_table(db)
            if materializing(context, LANCEDB_CHUNKS):
                mirrored = mirror_chunks(conn, table)
                yield dg.MaterializeResult(
                    asset_key=LANCEDB_CHUNKS,
                    metadata={
                        "dagster/row_count": mirrored.rows,
                        "dagster/column_schema": arrow_column_schema(table.schema),
                        "rows_inserted": mirrored.inserted,
                        "rows_deleted": mirrored.deleted,
                        "uri": lancedb.location,
                    },
                )
            if wanted(context, LANCEDB_CHUNKS, CHUNK_COUNTS_AGREE):
                in_postgres, in_lancedb = chunk_count(conn), table.count_rows()
                yield dg.AssetCheckResult(
                    asset_key=LANCEDB_CHUNKS,
                    check_name=CHUNK_COUNTS_AGREE,
                    passed=in_postgres == in_lancedb,
                    metadata={"postgres_chunks": in_postgres, "lancedb_chunks": in_lancedb},
                )


def _rechunk(
    context: dg.AssetExecutionContext,
    conn: psycopg.Connection,
    chunker: ChunkerResource,
    budgets: dict[str, int],
) -> tuple[dg.MaterializeResult, ChunkSummary]:
    result = rebuild_chunks(conn, chunker.chunker)
    context.log.info(
        f"re-chunked {result.conversations} conversations: {result.chunks_inserted} chunks "
        f"added, {result.chunks_removed} removed"
    )
    summary = chunk_summary(conn, budgets)
    total = sum(row[1] for row in summary.per_tier)
    token_meta: dict[str, float | int] = {}
    for tier, count, mean, p50, p95, biggest in summary.per_tier:
        token_meta |= {
            f"{tier}_chunks": count,
            f"{tier}_tokens_mean": round(mean, 1),
            f"{tier}_tokens_p50": p50,
            f"{tier}_tokens_p95": p95,
            f"{tier}_tokens_max": biggest,
        }
    buckets = [
        (f"{(b - 1) * 32:>3}-{b * 32 - 1:<3}" if b <= 8 else "256+", n)
        for b, n in summary.histogram
    ]
    metadata = {
        "dagster/row_count": total,
        "dagster/column_schema": postgres_column_schema(conn, "conversation_chunks"),
        "conversations_rechunked": result.conversations,
        "chunks_added": result.chunks_inserted,
        "chunks_removed": result.chunks_removed,
        "chunker": chunker.chunker.signature,
        **token_meta,
        "token_length_distribution": dg.MetadataValue.md(markdown_histogram(buckets)),
        "preview": dg.MetadataValue.md(
            markdown_table(
                ["conversation", "tier", "turns", "roles", "tokens", "content"],
                summary.latest,
            )
        ),
    }
    return dg.MaterializeResult(asset_key=POSTGRES_CHUNKS, metadata=metadata), summary
