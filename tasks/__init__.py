"""Thin Prefect tasks over the `catdog` library: storage, cache keys, retries, artifacts, logs."""
