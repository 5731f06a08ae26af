"""What the data is, before anything trains on it (no Prefect import).

- `inspect_images`: one cheap pass over every image: width, height, aspect ratio, colour mode,
  brightness, contrast, saturation, file size, and a 64-bit perceptual hash (pHash).
- `near_duplicate_groups`: images whose hashes are at most a few bits apart (resized,
  re-encoded or slightly cropped copies), found without comparing every pair.
- `profile`: per split and class, the count and the distribution of every property.
- `class_balance`, `property_drift`, `embedding_drift`: this run's training data against the
  data that trained production, each with its statistic, threshold and verdict.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catdog.hashing import read_checked

PROPERTIES = ("width", "height", "aspect", "brightness", "contrast", "saturation", "file_kb")

# pHash (as the `imagehash` library computes it): the 8x8 lowest frequencies of a 32x32
# grayscale DCT, each bit "above the median". Resizing and re-encoding barely move them; a crop
# does, so each image is also hashed on its central 90% and 80%, and a copy cropped by 5 or 10%
# on every side matches its original's hash of that centre.
CROP_SCALES = (1.0, 0.9, 0.8)
_HASH_SIDE = 8
_DCT_SIDE = 32
# Pixel statistics need no more than this: JPEGs decode at 1/2..1/8 scale (libjpeg's DCT
# scaling), a fraction of a full decode.
_STATS_SIDE = 64

# Chosen with bench/studies/near_duplicates.py on the real dataset (bench/RESULTS.md, section
# near-duplicates): copies resized to a half or a quarter, re-encoded at JPEG quality 50 or
# cropped by 5% on every side are at most 6 bits from their original (with centre hashes), and
# no two distinct images of the 3,000 are closer than 10; 8 is in between.
NEAR_DUPLICATE_BITS = 8

# Drift verdicts need both a difference worth a person's time and one that chance does not
# explain: large datasets make any difference significant, small ones make large differences
# by chance. Measured for false alarms in bench/studies/data_checks.py.
MAX_SHARE_CHANGE = 0.05  # total variation between the class shares
MAX_KS_DISTANCE = 0.1  # Kolmogorov-Smirnov distance between a property's distributions
SIGNIFICANCE = 0.001  # for the chi-square and Kolmogorov-Smirnov tests
EMBEDDING_SIGNIFICANCE = 0.01  # MMD permutation test
EMBEDDING_SAMPLE = 200  # feature vectors per side kept and compared
EMBEDDING_PERMUTATIONS = 500


@dataclass(frozen=True)
class Inspection:
    """Every image's properties (rows follow `paths`) and perceptual hash."""

    paths: tuple[str, ...]
    values: np.ndarray  # float64 (n, len(PROPERTIES))
    modes: tuple[str, ...]
    hashes: np.ndarray  # uint64 (n, len(CROP_SCALES)): the whole image's first

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(
                handle,
                paths=np.array(self.paths, dtype=str),
                values=self.values,
                modes=np.array(self.modes, dtype=str),
                hashes=self.hashes,
            )

    @classmethod
    def load(cls, path: Path) -> Inspection:
        with np.load(path) as data:
            return cls(
                paths=tuple(str(p) for p in data["paths"]),
                values=np.asarray(data["values"], dtype=np.float64),
                modes=tuple(str(m) for m in data["modes"]),
                hashes=np.asarray(data["hashes"], dtype=np.uint64).reshape(-1, len(CROP_SCALES)),
            )

    def rows(self, paths: Iterable[str]) -> np.ndarray:
        """The property rows of `paths`, in that order."""
        index = {path: i for i, path in enumerate(self.paths)}
        return self.values[[index[path] for path in paths]].reshape(-1, len(PROPERTIES))


@cache
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit pHash of an image (any mode)."""
    gray = image.convert("L").resize((_DCT_SIDE, _DCT_SIDE), Image.Resampling.LANCZOS)
    dct = _dct_matrix(_DCT_SIDE)
    coefficients = dct @ np.asarray(gray, dtype=np.float64) @ dct.T
    low = coefficients[:_HASH_SIDE, :_HASH_SIDE].ravel()
    bits = low > np.median(low)
    return int("".join("1" if bit else "0" for bit in bits), 2)


def centre_hashes(image: Image.Image) -> list[int]:
    """pHash of the image and of its centre at each of CROP_SCALES."""
    hashes = []
    for scale in CROP_SCALES:
        w, h = image.size
        dx, dy = round(w * (1 - scale) / 2), round(h * (1 - scale) / 2)
        hashes.append(perceptual_hash(image.crop((dx, dy, w - dx, h - dy)) if dx or dy else image))
    return hashes


def image_facts(path: Path, sha256: str | None = None) -> tuple[list[float], str, list[int]]:
    """(property values in PROPERTIES order, colour mode, centre hashes) of one image file;
    with `sha256`, only if its bytes are still those (see `catdog.hashing.read_checked`)."""
    data = read_checked(path, sha256) if sha256 else path.read_bytes()
    size = len(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            width, height, mode = image.width, image.height, image.mode
            if image.format == "JPEG":
                image.draft("RGB", (_STATS_SIDE, _STATS_SIDE))
            rgb = image.convert("RGB")
    rgb.thumbnail((_STATS_SIDE * 2, _STATS_SIDE * 2))
    luma = np.asarray(rgb.convert("L"), dtype=np.float64)
    saturation = np.asarray(rgb.convert("HSV"), dtype=np.float64)[..., 1]
    values = [
        float(width),
        float(height),
        width / height,
        float(luma.mean()),
        float(luma.std()),
        float(saturation.mean()),
        size / 1024,
    ]
    return values, mode, centre_hashes(rgb)


# Images inspected per sealed batch of facts: a run stopped midway keeps what it inspected.
INSPECTION_BATCH = 2048
Facts = tuple[list[float], str, list[int]]  # as `image_facts` returns them


def inspect_images(
    root: Path,
    paths: Sequence[str],
    workers: int | None = None,
    *,
    keys: Sequence[str] | None = None,
    known: Mapping[str, Facts] | None = None,
    keep: Callable[[list[tuple[str, Facts]]], None] | None = None,
) -> Inspection:
    """Properties and pHash of every image (paths relative to `root`), in a thread pool
    (Pillow releases the GIL while decoding).

    With `keys` (each image's content hash), an image whose facts are in `known` is not
    opened, and `keep` receives each batch of new facts as (key, facts) pairs.
    """
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    known = known or {}
    facts: list[Facts | None] = [
        _as_facts(known[key]) if keys is not None and key in known else None
        for key in (keys if keys is not None else [None] * len(paths))
    ]
    todo = [i for i, found in enumerate(facts) if found is None]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(todo), INSPECTION_BATCH):
            batch = todo[start : start + INSPECTION_BATCH]
            found = list(pool.map(lambda i: image_facts(root / paths[i], keys and keys[i]), batch))
            for i, image in zip(batch, found, strict=True):
                facts[i] = image
            if keep is not None and keys is not None:
                keep([(keys[i], image) for i, image in zip(batch, found, strict=True)])
    done = [f for f in facts if f is not None]
    return Inspection(
        paths=tuple(paths),
        values=np.array([f[0] for f in done], dtype=np.float64).reshape(-1, len(PROPERTIES)),
        modes=tuple(f[1] for f in done),
        hashes=np.array([f[2] for f in done], dtype=np.uint64).reshape(-1, len(CROP_SCALES)),
    )


def _as_facts(value: Any) -> Facts:
    """Facts read back from JSON (lists where tuples were)."""
    values, mode, hashes = value
    return [float(v) for v in values], str(mode), [int(h) for h in hashes]


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def near_duplicate_groups(hashes: np.ndarray, max_bits: int) -> list[list[int]]:
    """Groups (indices, two or more each, sorted) of images linked transitively, two images
    being linked when one's whole-image hash is at most `max_bits` from the other's hash of
    the whole image or of a centre (`hashes` as `Inspection.hashes`)."""
    every = np.arange(len(hashes))
    return groups_of(len(hashes), near_duplicate_links(hashes, max_bits, every, every))


def near_duplicate_links(
    hashes: np.ndarray, max_bits: int, queries: np.ndarray, candidates: np.ndarray
) -> set[tuple[int, int]]:
    """The links (i, j), i < j, between a query image and a candidate image: the candidate's
    whole-image hash at most `max_bits` from the query's hash of the whole or of a centre.

    Two hashes within `max_bits` agree exactly on at least one of `max_bits + 1` bands of
    their bits (pigeonhole), so only images sharing a band are compared, a bucket at a time
    (about n²/100 comparisons in numpy, instead of n²/2 in Python). Comparing only new images
    with all, and all with new ones, finds every link that involves a new image.
    """
    links: set[tuple[int, int]] = set()
    if len(hashes) == 0 or len(queries) == 0 or len(candidates) == 0:
        return links
    table = np.asarray(hashes, dtype=np.uint64).reshape(len(hashes), -1)
    whole = table[candidates, 0]
    edges = np.linspace(0, 64, max_bits + 2).astype(int)
    for low, high in itertools.pairwise(edges):
        shift, mask = np.uint64(low), np.uint64((1 << int(high - low)) - 1)
        keys = (whole >> shift) & mask
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        for scale in range(table.shape[1]):
            asked = table[queries, scale]
            bands = (asked >> shift) & mask
            starts = np.searchsorted(ordered, bands, side="left")
            counts = np.searchsorted(ordered, bands, side="right") - starts
            # Every (query, candidate in its bucket) pair at once: a loop over the queries
            # in Python took seconds for 30,000 images against a few new ones.
            asking = np.repeat(np.arange(len(queries)), counts)
            first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
            found = order[first + np.arange(len(asking))]
            near = np.bitwise_count(whole[found] ^ asked[asking]) <= max_bits
            i, j = queries[asking[near]], candidates[found[near]]
            other = i != j
            i, j = i[other], j[other]
            links.update(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist(), strict=True))
    return links


def groups_of(count: int, links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The groups (two or more, sorted) that `links` join among `count` images, transitively."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        if root(i) != root(j):
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(count):
        groups[root(i)].append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def incremental_links(
    hashes: np.ndarray, keys: Sequence[str], max_bits: int, earlier: Iterable[Mapping[str, Any]]
) -> tuple[set[tuple[int, int]], int]:
    """Every link among `keys`' images (see `near_duplicate_links`), reusing the links an
    earlier run found (`earlier`: {"compared": keys, "links": [[key, key]...], "max_bits"}
    each, every pair of its compared images compared; the one that shares most images is
    used). Returns the links (indices into `keys`) and how many images were compared anew."""
    index = {key: i for i, key in enumerate(keys)}
    usable = [note for note in earlier if note.get("max_bits") == max_bits]
    every = np.arange(len(keys))
    if not usable:
        return near_duplicate_links(hashes, max_bits, every, every), len(keys)
    best = max(usable, key=lambda note: sum(1 for key in note["compared"] if key in index))
    compared = {key for key in best["compared"] if key in index}
    new = np.array([i for i, key in enumerate(keys) if key not in compared], dtype=np.int64)
    links = {
        (min(index[a], index[b]), max(index[a], index[b]))
        for a, b in best["links"]
        if a in index and b in index
    }
    links |= near_duplicate_links(hashes, max_bits, new, every)
    links |= near_duplicate_links(hashes, max_bits, every, new)
    return links, len(new)


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {
        "min": round(float(values.min()), 3),
        "p5": round(float(p5), 3),
        "median": round(float(median), 3),
        "p95": round(float(p95), 3),
        "max": round(float(values.max()), 3),
        "mean": round(float(values.mean()), 3),
    }


def profile(
    inspection: Inspection, groups: Mapping[tuple[str, str], Sequence[str]]
) -> dict[str, Any]:  # JSON, as profile.json holds it: one key per property
    """Per (split, class): the count, colour modes and each property's distribution
    (min, 5th percentile, median, 95th percentile, max, mean)."""
    index = {path: i for i, path in enumerate(inspection.paths)}
    splits: dict[str, dict[str, Any]] = defaultdict(dict)
    for (split, class_name), paths in groups.items():
        rows = [index[path] for path in paths]
        values = inspection.values[rows].reshape(-1, len(PROPERTIES))
        modes: dict[str, int] = defaultdict(int)
        for row in rows:
            modes[inspection.modes[row]] += 1
        splits[split][class_name] = {
            "count": len(rows),
            "modes": dict(sorted(modes.items())),
            **{name: _summary(values[:, k]) for k, name in enumerate(PROPERTIES)},
        }
    return {"properties": list(PROPERTIES), "splits": dict(splits)}


@dataclass(frozen=True)
class DataCheck:
    """One check's verdict: `passed` is False when the data changed more than `threshold`
    allows (and by more than chance, as `detail` says)."""

    name: str
    passed: bool
    statistic: float
    threshold: float
    detail: str

    def to_json(self) -> dict[str, Any]:  # a row of the record's checks and the UI's table
        return asdict(self)


def _upper_gamma(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) (Numerical Recipes, 6.2)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P(a, x)
        term = total = 1.0 / a
        n = a
        for _ in range(500):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # continued fraction for Q(a, x)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, h * math.exp(log_front))


def chi_square_p_value(statistic: float, dof: int) -> float:
    return _upper_gamma(dof / 2, statistic / 2) if dof > 0 else 1.0


def class_balance(reference: Mapping[str, int], current: Mapping[str, int]) -> DataCheck:
    """Did the classes' shares change? Total variation distance between the shares, and a
    chi-square test of homogeneity on the counts."""
    classes = sorted(set(reference) | set(current))
    table = np.array(
        [[reference.get(c, 0) for c in classes], [current.get(c, 0) for c in classes]],
        dtype=np.float64,
    )
    totals = table.sum(axis=1, keepdims=True)
    shares = table / np.maximum(totals, 1)
    distance = float(np.abs(shares[0] - shares[1]).sum() / 2)
    expected = totals * table.sum(axis=0, keepdims=True) / max(table.sum(), 1)
    used = expected > 0
    statistic = float((((table - expected) ** 2)[used] / expected[used]).sum())
    p_value = chi_square_p_value(statistic, int(used.all(axis=0).sum()) - 1)
    passed = not (distance > MAX_SHARE_CHANGE and p_value < SIGNIFICANCE)
    shown = ", ".join(
        f"{c} {shares[0][k]:.1%} -> {shares[1][k]:.1%}" for k, c in enumerate(classes)
    )
    return DataCheck(
        "class_balance",
        passed,
        round(distance, 4),
        MAX_SHARE_CHANGE,
        f"class shares {shown}; chi-square {statistic:.1f}, p = {p_value:.2g} (fails when the "
        f"shares move by more than {MAX_SHARE_CHANGE:g} and p < {SIGNIFICANCE:g})",
    )


def ks_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (distance, asymptotic p-value)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if a.size == 0 or b.size == 0:
        return 0.0, 1.0
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    distance = float(np.abs(cdf_a - cdf_b).max())
    effective = math.sqrt(a.size * b.size / (a.size + b.size))
    lam = (effective + 0.12 + 0.11 / effective) * distance
    if lam < 1e-3:
        return distance, 1.0
    terms = [(-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101)]
    return distance, float(min(1.0, max(0.0, 2 * sum(terms))))


def property_drift(name: str, reference: np.ndarray, current: np.ndarray) -> DataCheck:
    """Did the distribution of image property `name` change? (Kolmogorov-Smirnov)"""
    distance, p_value = ks_test(reference, current)
    passed = not (distance > MAX_KS_DISTANCE and p_value < SIGNIFICANCE)
    return DataCheck(
        f"property:{name}",
        passed,
        round(distance, 4),
        MAX_KS_DISTANCE,
        f"{name} median {np.median(reference):.4g} -> {np.median(current):.4g}; "
        f"Kolmogorov-Smirnov distance {distance:.3f}, p = {p_value:.2g} (fails above "
        f"{MAX_KS_DISTANCE:g} with p < {SIGNIFICANCE:g})",
    )


def sample_rows(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """At most `size` rows, drawn without replacement (all of them, in order, if fewer)."""
    if len(rows) <= size:
        return np.asarray(rows)
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size, replace=False))
    return np.asarray(rows[pick])


def embedding_drift(
    reference: np.ndarray,
    current: np.ndarray,
    *,
    seed: int = 0,
    permutations: int = EMBEDDING_PERMUTATIONS,
) -> DataCheck:
    """Do this run's feature vectors come from the reference's distribution? Maximum mean
    discrepancy (an RBF kernel at the median distance) against its permutation null: the
    check fails when MMD² is above the null's 1 - EMBEDDING_SIGNIFICANCE quantile."""
    x = sample_rows(reference, EMBEDDING_SAMPLE, seed).astype(np.float64)
    y = sample_rows(current, EMBEDDING_SAMPLE, seed + 1).astype(np.float64)
    both = np.concatenate([x, y])
    squared = np.sum(both**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * both @ both.T, 0)
    bandwidth = float(np.median(distances[np.triu_indices(len(both), 1)])) or 1.0
    kernel = np.exp(-distances / bandwidth)
    # A permutation is a ±1/n weight vector w; MMD² (biased) is wᵀ K w, all at once.
    n, m = len(x), len(y)
    sides = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])
    rng = np.random.default_rng(seed)
    weights = np.stack([sides] + [rng.permutation(sides) for _ in range(permutations)], axis=1)
    mmd = np.einsum("ip,ip->p", weights, kernel @ weights)
    statistic, null = float(mmd[0]), mmd[1:]
    threshold = float(np.quantile(null, 1 - EMBEDDING_SIGNIFICANCE))
    p_value = (1 + int((null >= statistic).sum())) / (1 + permutations)
    return DataCheck(
        "embeddings",
        statistic <= threshold,
        round(statistic, 6),
        round(threshold, 6),
        f"MMD² of {n} reference and {m} current feature vectors, permutation p = "
        f"{p_value:.3g} ({permutations} permutations; fails above the null's "
        f"{1 - EMBEDDING_SIGNIFICANCE:.0%} quantile)",
    )
