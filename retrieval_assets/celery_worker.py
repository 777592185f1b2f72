"""The celery app the workers run (`retrieval-assets worker`, which starts
`celery -A retrieval_assets.celery_worker worker`): dagster-celery's step task, on the broker
CELERY_BROKER_URL names, with the project's settings checked first.

Imported by the worker's main process before it forks its pool, with the definitions built (as
the step forkserver does, retrieval_assets.preload): each pool process starts with them in memory.
"""

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

import retrieval_assets.preload  # noqa: F401  (the definitions, built once before the fork)
from retrieval_assets.lib.settings import check_environment
from retrieval_assets.lib.workers import broker_url, worker_app_args

check_environment()
app = make_app(worker_app_args(broker_url()))
execute_plan = create_task(app)
