"""Small renderers for materialization metadata (markdown tables and histograms)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import dagster as dg


def _cell(value: object, width: int = 90) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_histogram(buckets: Sequence[tuple[str, int]], width: int = 40) -> str:
    """A bar chart in a markdown code block: label, bar, count."""
    top = max((count for _, count in buckets), default=0) or 1
    label_width = max((len(label) for label, _ in buckets), default=0)
    bars = [
        f"{label:>{label_width}} | {'█' * round(width * count / top):<{width}} {count}"
        for label, count in buckets
    ]
    return "```\n" + "\n".join(bars) + "\n```"


def arrow_column_schema(schema: Any, names: Sequence[str] | None = None) -> dg.TableSchema:
    """The `dagster/column_schema` of an Arrow schema (a LanceDB table's), or of its `names`."""
    fields = [schema.field(n) for n in names] if names is not None else list(schema)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                f.name,
                str(f.type),
                constraints=dg.TableColumnConstraints(nullable=f.nullable),
            )
            for f in fields
        ]
    )


def postgres_column_schema(
    conn: Any, table: str, names: Sequence[str] | None = None
) -> dg.TableSchema:
    """The `dagster/column_schema` of a Postgres table (or of its `names`), read from the catalog
    so that it says what the database holds (vector types with their dimensions)."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull "
        "FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY a.attnum",
        [table],
    ).fetchall()
    wanted = [r for r in rows if names is None or r[0] in names]
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, kind, constraints=dg.TableColumnConstraints(nullable=nullable))
            for name, kind, nullable in wanted
        ]
    )
