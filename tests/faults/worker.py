"""A run worker the fault suite can kill, starve of disk or race: fills one LanceDB column.

    python -m tests.faults.worker <database_url> <lancedb_uri> <models_dir> <rows_per_batch> \
        [<lancedb_storage_options_json>]

Prints one line per committed batch (flushed), so the suite knows when to strike.
"""

import sys

from retrieval_assets.cli import exit_without_teardown
from retrieval_assets.lib.columns import COARSE
from retrieval_assets.lib.embedders import FastEmbedResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.stores.lancedb import LanceDBColumns


class PrintLog:
    def info(self, message: str) -> None:
        print(message, flush=True)

    warning = info


def main() -> None:
    database_url, lance_uri, models, batch_rows = sys.argv[1:5]
    options = sys.argv[5] if len(sys.argv) > 5 else ""
    store = LanceDBColumns(
        PostgresResource(database_url=database_url),
        LanceDBResource(uri=lance_uri, write_batch_rows=int(batch_rows), storage_options=options),
    )
    metadata = store.fill(
        COARSE, FastEmbedResource(data_dir=models, batch_size=8), None, PrintLog()
    )
    print(f"done {metadata['rows_embedded']}", flush=True)


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # as the command does: the teardown only costs the test time
