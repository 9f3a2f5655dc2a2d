"""``[core] hostname_callable`` for the Celery test: each worker names itself, though all run on one host."""

import os


def hostname() -> str:
    return os.environ["OVERNIGHT_TEST_WORKER_NAME"]
