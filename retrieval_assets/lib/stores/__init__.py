"""The stores that hold vector columns, each implementing the same verbs (lib/columns.py
ColumnStore): ensure a column, its backlog per shard, fill it, check it. A column's declaration
names its store by key here."""

from retrieval_assets.lib.stores.lancedb import LanceDBColumns
from retrieval_assets.lib.stores.postgres import PostgresColumns

STORES: dict[str, type[LanceDBColumns] | type[PostgresColumns]] = {
    "lancedb": LanceDBColumns,
    "postgres": PostgresColumns,
}
