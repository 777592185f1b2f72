"""Imported last by the step forkserver only (`step_server.PRELOAD`): the server leaves without
the interpreter's teardown, as the `retrieval-assets` command does (`cli.console_main`).

The forkserver exits (by SystemExit) once the process that started it is gone. Its teardown, the
garbage collection of the Dagster, LanceDB and definitions modules it preloaded, took about 2 s,
and it held the command's stdout and stderr meanwhile: whoever reads the command's output to its
end (a pipe, `subprocess.run(capture_output=True)`) waited for it after the command had exited.
The server has nothing to flush. The step processes forked from it never run these handlers:
multiprocessing ends each of them with os._exit.
"""

import atexit
import os

# Registered after the preloaded modules' own handlers, so it runs first (atexit is LIFO).
atexit.register(os._exit, 0)
