"""The LanceDB chunk table (real LanceDB): mirroring inserts."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa

from retrieval_assets.lib.columns import COARSE
from retrieval_assets.lib.lancedb_store import (
    CHUNKS_TABLE,
    ROW_VERSION,
    chunk_schema,
    ensure_row_version,
    insert_missing,
    rows_to_arrow,
)
from retrieval_assets.lib.vectors import vector_field


def chunk(i: int) -> tuple:
    return (f"{i:032x}", "u", "c", "medium", i, 0, 1, ["user"], f"text {i}", "h", 3, None)


def test_inserting_missing_chunks_writes_whole_rows_and_leaves_existing_ones(tmp_path):
    table = lancedb.connect(tmp_path).create_table(CHUNKS_TABLE, schema=chunk_schema())
    table.add_columns(vector_field(COARSE.column, 4))
    ensure_row_version(table)
    insert_missing(table, rows_to_arrow([chunk(0)]))
    vector = pa.array([[1.0, 0.0, 0.0, 0.0]], type=table.schema.field(COARSE.column).type)
    filled = (
        table.search()
        .to_arrow()
        .set_column(table.schema.get_field_index(COARSE.column), COARSE.column, vector)
    )
    table.merge_insert("chunk_id").when_matched_update_all().execute(filled)

    insert_missing(table, rows_to_arrow([chunk(0), chunk(1)]))  # chunk 0 exists already

    rows = {r["chunk_id"]: r for r in table.search().to_arrow().to_pylist()}
    assert len(rows) == 2
    assert np.allclose(rows[f"{0:032x}"][COARSE.column], [1, 0, 0, 0])
    new = rows[f"{1:032x}"]
    assert new[COARSE.column] is None and new[ROW_VERSION] is None
    assert new["content"] == "text 1" and new["chunk_index"] == 1
