"""Thin Prefect tasks over the `catdog` library: storage, cache keys, retries, artifacts, logs."""

import logging

# Prefect gives the library's loggers its handlers (PREFECT_LOGGING_EXTRA_LOGGERS), not a
# level. Set here, where every process that runs a task passes, Dask workers included.
for _library in ("catdog", "tasks"):
    logging.getLogger(_library).setLevel(logging.INFO)
