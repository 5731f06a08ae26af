"""The benchmarks a user or reviewer reruns (`python bench/<name>.py`) and their shared helpers.

Every script puts the repository root on `sys.path` and imports `bench.common`, so each runs as
`python bench/x.py` or `python bench/studies/y.py` from the root. One-off studies (questions
answered once, kept to be rerun if the question comes back) live in `bench/studies/`.
"""
