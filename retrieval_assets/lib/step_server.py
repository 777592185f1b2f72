"""The step processes' forkserver (definitions.EXECUTOR: the multiprocess executor forks each
step from a server that preloaded the definitions), started ahead of the run.

Its imports (Dagster, the definitions, LanceDB: about 4 s) otherwise start only when the run's
first step does, after the command has imported Dagster and started the embedded server itself;
started first, they happen meanwhile, on the other core. The executor then finds it running.
"""

from __future__ import annotations

# The definitions and libraries, then the server's exit without the interpreter's teardown.
PRELOAD = ["retrieval_assets.preload", "retrieval_assets.lib.quick_exit"]
# What the executor puts before the preload list it hands multiprocessing (dagster's
# _core/executor/multiprocess.py): the same list, so the server started here is the one it wants.
_EXECUTOR_FIRST = "dagster._core.executor.multiprocess"


def start_early() -> None:
    """Start the forkserver now (it inherits this process's environment as it is now)."""
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload([_EXECUTOR_FIRST, *PRELOAD])
    forkserver.ensure_running()
