"""The data stage: download, extract, manifest, split, counts, and decoded image arrays."""
