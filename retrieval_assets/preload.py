"""Imported by the step processes' forkserver (see definitions.EXECUTOR): the definitions and the
main job are built here once, and the libraries every store step imports are imported here once,
so each step process forks with them in memory instead of paying for them again.

LanceDB (the slowest import of a store step) warns that fork support is experimental: a fork
while another thread is inside one of its operations could deadlock the child. This process
imports it and does nothing else with it, so no operation is ever in flight when it forks; the
warning is silenced for that.
"""

import warnings

import lancedb  # noqa: F401  (imported for the step processes)

from retrieval_assets.cli import main_job

warnings.filterwarnings(
    "ignore", message="lancedb fork support is experimental", category=RuntimeWarning
)
main_job()
