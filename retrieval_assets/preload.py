"""Imported by the step processes' forkserver (see definitions.EXECUTOR): the definitions and the
main job are built here once, and every step process forks with them in memory."""

from retrieval_assets.cli import main_job

main_job()
