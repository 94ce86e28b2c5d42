"""Drift: what the serving path sees, compared with what it saw at export (Population Stability Index).

Each answer the models make yields one :class:`DriftSample`: six **distributions**
(:data:`DISTRIBUTIONS`) of what the pipeline read and produced:

=========================  ==================================================================
``history_length``         items in the history window the models read (1 value)
``user_norm``              L2 norm of the user tower's vector (1 value)
``retrieval_score``        FAISS inner product of the returned items (top :data:`OBSERVED_TOP`)
``ranker_score``           ranker score of the returned items (top :data:`OBSERVED_TOP`)
``recommended_popularity`` training-period rating count of the returned items (top 10)
``history_genres``         genre of each history item, one count per (item, genre)
=========================  ==================================================================

Fallback answers (popular movies) make no sample: they are counted by
``recsys_fallbacks_total`` instead.

The **reference** (:class:`DriftReference`) is written at export by
``export/drift_reference.py``: the same :func:`drift_sample` over the serving pipeline run
in process on every training user's final history (a sample of them on large data), binned
with **fixed bins saved in the reference**: deciles of the reference's own values for the
numeric distributions (repeated edges merged), one bin per genre for ``history_genres``.
The file (:data:`~orchestrator.artifacts.DRIFT_REFERENCE`) is one of the artifacts whose
sha256 every published version records.

The serving side (:class:`DriftHistograms`) counts the same bins in two generations of
``window_requests`` answers each, so the PSI describes the last ``window_requests`` to
``2 * window_requests`` answers in bounded memory, and a drift that ends stops alerting.
:func:`psi` is the one definition used online (``recsys_drift_psi``) and offline
(``recsys drift``)::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i),   p_i = (c_i / n + eps) / (1 + B * eps)

with ``e`` the reference's and ``a`` the served proportions over ``B`` bins, each smoothed by
:data:`PSI_EPSILON` so that an empty bin gives a large but finite term. Usual reading
(Siddiqi, *Credit Risk Scorecards*, 2006): < 0.1 stable, 0.1-0.25 a shift worth a look,
> 0.25 (:data:`PSI_ALERT`) a population that changed.

This module imports numpy only: the orchestrator and the offline side both use it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DISTRIBUTIONS = (
    "history_length",
    "user_norm",
    "retrieval_score",
    "ranker_score",
    "recommended_popularity",
    "history_genres",
)
"""The distributions compared, in table order (the ``distribution`` label's values)."""
CATEGORICAL = ("history_genres",)
"""Distributions with one bin per category (genre index) instead of numeric edges."""
OBSERVED_TOP = 10
"""Returned items observed per answer: the first 10, so the reference holds for any ``k`` >= 10."""
PSI_EPSILON = 1e-4
"""Additive smoothing of each bin's proportion (see the module docstring)."""
PSI_ALERT = 0.25
"""PSI above which a distribution counts as drifted (the Prometheus alert's threshold)."""
REFERENCE_BINS = 10
"""Numeric bins: the reference's deciles (fewer when values repeat)."""
DEFAULT_WINDOW_REQUESTS = 5000
"""Answers per serving-side generation: PSI covers the last 5,000-10,000 answers."""
DEFAULT_MIN_REQUESTS = 200
"""Below this many answers in the window the PSI is NaN: a handful of answers is noise, not drift."""
REFERENCE_FORMAT = 1
SIGNIFICANT_DIGITS = 5
"""Reference edges are rounded to 5 significant digits."""
EDGE_TOLERANCE = 1e-5
"""A value less than this (relative) below an edge counts as on it: a float's last bits (a unit
vector's norm is 0.99999994 in one runtime, 1.0 in another) must not move it across an edge."""


LOGGED_DECIMALS = 6
"""Decimals of the scores and the user norm a sample keeps (:func:`drift_sample`, the request log)."""


def rounded(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits (float64; zeros and non-finite kept)."""
    v = np.asarray(values, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(np.isfinite(v) & (v != 0), 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v)))), 1.0)
    return np.round(v * scale) / scale


@dataclass(frozen=True)
class DriftSample:
    """What one model answer showed of each distribution (see the module docstring).

    Attributes:
        history_length: Items in the window.
        user_norm: L2 norm of the user vector.
        retrieval_scores: float32 retrieval scores of the first returned items.
        ranker_scores: float32 ranker scores of the same items.
        popularity: float32 rating counts of the same items.
        genres: int64 genre index per (history item, genre).
    """

    history_length: int
    user_norm: float
    retrieval_scores: np.ndarray
    ranker_scores: np.ndarray
    popularity: np.ndarray
    genres: np.ndarray

    def values(self) -> dict[str, np.ndarray]:
        """Each distribution's observed values (arrays), keyed as :data:`DISTRIBUTIONS`."""
        return {
            "history_length": np.array([self.history_length], np.float64),
            "user_norm": np.array([self.user_norm], np.float64),
            "retrieval_score": self.retrieval_scores,
            "ranker_score": self.ranker_scores,
            "recommended_popularity": self.popularity,
            "history_genres": self.genres,
        }

    def to_json(self) -> str:
        """A compact JSON text for the request log (scores and norm as :func:`drift_sample` rounded them)."""
        return json.dumps(
            {
                "h": self.history_length,
                "n": round(self.user_norm, LOGGED_DECIMALS),
                # tolist(): Python floats / ints equal to float(x) / int(x) of each element, made
                # in C (the genre list holds ~100 entries per request; this runs for every row)
                "r": [round(x, LOGGED_DECIMALS) for x in np.asarray(self.retrieval_scores, np.float64).tolist()],
                "s": [round(x, LOGGED_DECIMALS) for x in np.asarray(self.ranker_scores, np.float64).tolist()],
                "p": np.asarray(self.popularity, np.float64).tolist(),
                "g": np.asarray(self.genres, np.int64).tolist(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> DriftSample:
        """Reads :meth:`to_json`'s text back.

        Raises:
            ValueError: Not such a text.
        """
        try:
            d = json.loads(text)
            return cls(
                int(d["h"]),
                float(d["n"]),
                np.asarray(d["r"], np.float32),
                np.asarray(d["s"], np.float32),
                np.asarray(d["p"], np.float32),
                np.asarray(d["g"], np.int64),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a drift sample: {text[:80]!r}") from exc


def drift_sample(
    window_items: np.ndarray,
    user_vector: np.ndarray,
    retrieval_scores: np.ndarray,
    ranker_scores: np.ndarray,
    items: np.ndarray,
    popularity: np.ndarray,
    genre_matrix: np.ndarray,
) -> DriftSample:
    """The sample of one model answer: a norm, a few gathers (a few microseconds).

    Args:
        window_items: int64 [L] the history window (-1 padded).
        user_vector: float32 [dim] the user tower's output.
        retrieval_scores: Retrieval scores of the returned items, best first.
        ranker_scores: Ranker scores of the returned items, aligned.
        items: int64 item indices of the returned items, aligned.
        popularity: int64 [n_items] the catalog's rating counts.
        genre_matrix: float32 [n_items, n_genres] 0/1 genre membership.
    """
    hist = window_items[window_items >= 0]
    top = slice(0, OBSERVED_TOP)
    # rounded as the request log stores them, so the live histogram and `recsys drift`'s table
    # over the log bin the same values (a raw score a hair below an edge could round onto it)
    return DriftSample(
        int(len(hist)),
        round(float(np.sqrt(np.dot(user_vector, user_vector))), LOGGED_DECIMALS),
        _logged(retrieval_scores[top]),
        _logged(ranker_scores[top]),
        np.asarray(popularity[items[top]], np.float32),
        np.nonzero(genre_matrix[hist])[1].astype(np.int64),
    )


def _logged(scores: np.ndarray) -> np.ndarray:
    """float32 ``scores`` rounded to :data:`LOGGED_DECIMALS` decimals: the values the log keeps."""
    return np.round(np.asarray(scores, np.float64), LOGGED_DECIMALS).astype(np.float32)


# ------------------------------------------------------------------------------ bins and PSI


@dataclass(frozen=True)
class Bins:
    """Fixed bins of one distribution.

    Attributes:
        edges: float64 ascending inner edges (numeric): bin ``i`` holds ``edges[i-1] <= x < edges[i]``.
        categories: Category names (categorical): bin ``i`` holds the value ``i``.
    """

    edges: np.ndarray | None = None
    categories: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.edges is not None:  # the comparison edges, lowered by the tolerance once
            object.__setattr__(self, "_lowered", self.edges - np.abs(self.edges) * EDGE_TOLERANCE)

    @property
    def n_bins(self) -> int:
        return len(self.categories) if self.categories is not None else len(self.edges) + 1  # type: ignore[arg-type]

    def index(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value (categorical values outside the categories are dropped)."""
        if self.categories is not None:
            v = np.asarray(values, np.int64)
            return v[(v >= 0) & (v < len(self.categories))]
        lowered: np.ndarray = self._lowered  # type: ignore[attr-defined]
        return np.searchsorted(lowered, np.asarray(values, np.float64), side="right")

    def labels(self) -> list[str]:
        """A readable name per bin."""
        if self.categories is not None:
            return list(self.categories)
        e = [f"{x:.4g}" for x in self.edges]  # type: ignore[union-attr]
        return [f"< {e[0]}" if e else "all", *[f"[{a}, {b})" for a, b in zip(e, e[1:])], *([f">= {e[-1]}"] if e else [])]

    def to_json(self) -> dict[str, Any]:
        if self.categories is not None:
            return {"categories": list(self.categories)}
        return {"edges": [float(x) for x in self.edges]}  # type: ignore[union-attr]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Bins:
        if "categories" in d:
            return cls(categories=tuple(str(c) for c in d["categories"]))
        return cls(edges=np.asarray(d["edges"], np.float64))


def quantile_edges(values: np.ndarray, bins: int = REFERENCE_BINS) -> np.ndarray:
    """Inner edges at the ``bins``-quantiles of ``values``, repeated edges merged.

    A value equal to an edge falls in the bin above it, so a mass point (e.g. full history
    windows) gets a bin of its own.
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return np.zeros(0, np.float64)
    return np.unique(rounded(np.quantile(v, np.arange(1, bins) / bins)))


def proportions(counts: np.ndarray, eps: float = PSI_EPSILON) -> np.ndarray:
    """Bin shares smoothed by ``eps`` (module docstring); uniform when there are no counts."""
    c = np.asarray(counts, np.float64)
    total = c.sum()
    share = c / total if total > 0 else np.full(len(c), 1.0 / max(len(c), 1))
    return (share + eps) / (1.0 + len(c) * eps)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPSILON) -> float:
    """Population Stability Index of ``actual`` counts against ``expected`` counts over the same bins.

    Returns:
        PSI >= 0; NaN when ``actual`` holds no counts.

    Raises:
        ValueError: The two count vectors have different lengths.
    """
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} reference bins vs {len(actual)} observed bins")
    if np.sum(actual) <= 0:
        return math.nan
    e, a = proportions(expected, eps), proportions(actual, eps)
    return float(np.sum((a - e) * np.log(a / e)))


# ------------------------------------------------------------------------------ the reference


@dataclass(frozen=True)
class DriftReference:
    """The export's distributions: fixed bins and counts per distribution.

    Attributes:
        bins: Per distribution, its bins.
        counts: Per distribution, int64 counts per bin.
        requests: Answers the reference was computed from.
        meta: How it was computed (users, k, settings, seed).
    """

    bins: dict[str, Bins]
    counts: dict[str, np.ndarray]
    requests: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples: Iterable[DriftSample], genres: Iterable[str], meta: Mapping[str, Any] | None = None) -> DriftReference:
        """Bins from the samples' own values (deciles; one bin per genre), then their counts."""
        samples = list(samples)
        if not samples:
            raise ValueError("no drift samples: the reference needs model answers")
        pooled = {d: np.concatenate([s.values()[d] for s in samples]) for d in DISTRIBUTIONS}
        bins = {d: Bins(categories=tuple(genres)) if d in CATEGORICAL else Bins(edges=quantile_edges(pooled[d])) for d in DISTRIBUTIONS}
        counts = {d: np.bincount(bins[d].index(pooled[d]), minlength=bins[d].n_bins).astype(np.int64) for d in DISTRIBUTIONS}
        return cls(bins, counts, len(samples), dict(meta or {}))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REFERENCE_FORMAT,
            "requests": self.requests,
            "meta": self.meta,
            "distributions": {d: {**self.bins[d].to_json(), "counts": self.counts[d].tolist()} for d in DISTRIBUTIONS},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DriftReference:
        """Reads :meth:`to_json`'s dict.

        Raises:
            ValueError: Another format, a distribution missing, or counts that do not fit the bins.
        """
        if d.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"drift reference format {d.get('format')!r}, expected {REFERENCE_FORMAT}")
        dists = d.get("distributions", {})
        missing = [x for x in DISTRIBUTIONS if x not in dists]
        if missing:
            raise ValueError(f"drift reference lacks {missing}")
        bins = {x: Bins.from_json(dists[x]) for x in DISTRIBUTIONS}
        counts = {x: np.asarray(dists[x]["counts"], np.int64) for x in DISTRIBUTIONS}
        for x in DISTRIBUTIONS:
            if len(counts[x]) != bins[x].n_bins:
                raise ValueError(f"drift reference {x}: {len(counts[x])} counts for {bins[x].n_bins} bins")
        return cls(bins, counts, int(d.get("requests", 0)), dict(d.get("meta", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DriftReference:
        """Reads a reference file (see :meth:`from_json` for the errors)."""
        return cls.from_json(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------ serving side


class DriftHistograms:
    """Thread-safe counts of the reference's bins over the last answers (bounded memory).

    Two generations of ``window_requests`` answers each: when the current one is full the
    older one is dropped. Memory is the bins' counts, whatever the traffic.

    Args:
        reference: Whose bins are counted.
        window_requests: Answers per generation.
        min_requests: Fewer answers in the window give NaN PSIs.
    """

    def __init__(self, reference: DriftReference, window_requests: int = DEFAULT_WINDOW_REQUESTS, min_requests: int = DEFAULT_MIN_REQUESTS):
        if window_requests < 1 or min_requests < 1:
            raise ValueError("window_requests and min_requests must be >= 1")
        self.reference = reference
        self.window_requests = window_requests
        self.min_requests = min_requests
        self._lock = threading.Lock()
        self._current = self._zeros()
        self._previous = self._zeros()
        self._n_current = 0
        self._n_previous = 0

    def _zeros(self) -> dict[str, np.ndarray]:
        return {d: np.zeros(self.reference.bins[d].n_bins, np.int64) for d in DISTRIBUTIONS}

    def observe(self, sample: DriftSample) -> None:
        """Counts one answer (bin indices computed outside the lock)."""
        values = sample.values()
        binned = {d: self.reference.bins[d].index(values[d]) for d in DISTRIBUTIONS}
        with self._lock:
            if self._n_current >= self.window_requests:
                self._previous, self._n_previous = self._current, self._n_current
                self._current, self._n_current = self._zeros(), 0
            for d, idx in binned.items():
                current = self._current[d]
                current += np.bincount(idx, minlength=len(current))
            self._n_current += 1

    @property
    def requests(self) -> int:
        """Answers in the window now."""
        with self._lock:
            return self._n_current + self._n_previous

    def counts(self) -> dict[str, np.ndarray]:
        """Per distribution, counts per bin over the window (a copy)."""
        with self._lock:
            return {d: self._current[d] + self._previous[d] for d in DISTRIBUTIONS}

    def psi(self) -> dict[str, float]:
        """Per distribution, PSI of the window against the reference (NaN below ``min_requests``)."""
        with self._lock:
            n = self._n_current + self._n_previous
            counts = {d: self._current[d] + self._previous[d] for d in DISTRIBUTIONS}
        if n < self.min_requests:
            return {d: math.nan for d in DISTRIBUTIONS}
        return {d: psi(self.reference.counts[d], counts[d]) for d in DISTRIBUTIONS}


def psi_table(reference: DriftReference, counts: Mapping[str, np.ndarray], requests: int) -> str:
    """The PSI of each distribution as plain text (``recsys drift``), the drifted ones marked."""
    lines = [f"{'distribution':<24} {'PSI':>8}  {'bins':>4}  state", "-" * 52]
    for d in DISTRIBUTIONS:
        value = psi(reference.counts[d], counts[d])
        state = "no data" if math.isnan(value) else ("DRIFT" if value > PSI_ALERT else ("shift" if value > 0.1 else "stable"))
        lines.append(f"{d:<24} {value:>8.4f}  {reference.bins[d].n_bins:>4}  {state}")
    lines.append(f"{requests:,} answers vs a reference of {reference.requests:,}; alert above {PSI_ALERT}")
    return "\n".join(lines)


class DriftMonitor:
    """The serving side's histograms, one set per model version that answered (at most ``keep``).

    A version's histograms start at its first answer against its reference (a hot reload
    brings a new reference with the new version); a version that has not answered for
    ``stale_s`` is no longer reported, so a retired version's last PSI cannot keep an alert
    firing.

    Args:
        window_requests: See :class:`DriftHistograms`.
        min_requests: See :class:`DriftHistograms`.
        keep: Versions tracked at once (the A/B arms, the one being replaced).
        stale_s: Seconds without an answer after which a version is not reported.
    """

    def __init__(
        self,
        window_requests: int = DEFAULT_WINDOW_REQUESTS,
        min_requests: int = DEFAULT_MIN_REQUESTS,
        keep: int = 2,
        stale_s: float = 600.0,
    ):
        self.window_requests = window_requests
        self.min_requests = min_requests
        self.keep = keep
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._by_version: dict[str, tuple[DriftHistograms, float]] = {}

    def observe(self, model_version: str, reference: DriftReference, sample: DriftSample) -> None:
        """Counts one answer of ``model_version`` against its ``reference``."""
        now = time.monotonic()
        with self._lock:
            entry = self._by_version.get(model_version)
            if entry is None or entry[0].reference is not reference:
                hist = DriftHistograms(reference, self.window_requests, self.min_requests)
                self._by_version[model_version] = (hist, now)
                while len(self._by_version) > self.keep:  # the longest-silent version goes
                    oldest = min(self._by_version, key=lambda v: self._by_version[v][1])
                    del self._by_version[oldest]
            else:
                hist = entry[0]
                self._by_version[model_version] = (hist, now)
        hist.observe(sample)

    def histograms(self) -> dict[str, DriftHistograms]:
        """Per model version that answered within ``stale_s``, its histograms."""
        now = time.monotonic()
        with self._lock:
            return {v: h for v, (h, seen) in self._by_version.items() if now - seen <= self.stale_s}


# ------------------------------------------------------------------------------ offline


def drift_report(
    log_path: str | Path, reference: DriftReference, model_version: str | None = None, last: int | None = None
) -> dict[str, Any]:
    """PSI of the request log's drift samples against ``reference`` (``recsys drift``).

    The samples go through :class:`DriftHistograms` and :func:`psi`, the code behind
    ``recsys_drift_psi``, in one window that holds them all. The log is opened read-only
    (the server may be running).

    Args:
        log_path: The request log (SQLite, ``orchestrator/requestlog.py``).
        reference: The served version's reference.
        model_version: Only rows of this version (None: every row with a sample).
        last: Only the newest ``last`` such rows (None: all).

    Returns:
        ``{"log", "answers", "model_versions", "psi": {distribution: value}, "alert": bool,
        "counts": {distribution: [...]}}`` (PSIs NaN when no row has a sample).

    Raises:
        FileNotFoundError: No such log.
        sqlite3.Error: Not a request log.
        ValueError: A sample that does not parse.
    """
    import sqlite3

    path = Path(log_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    sql = "SELECT drift, model_version FROM requests WHERE drift IS NOT NULL"
    params: list[Any] = []
    if model_version is not None:
        sql += " AND model_version = ?"
        params.append(model_version)
    sql += " ORDER BY timestamp DESC"
    if last is not None:
        sql += " LIMIT ?"
        params.append(int(last))
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    hist = DriftHistograms(reference, window_requests=max(len(rows), 1), min_requests=1)
    for text, _ in rows:
        hist.observe(DriftSample.from_json(text))
    values = hist.psi()
    return {
        "log": str(path),
        "answers": len(rows),
        "model_versions": sorted({v for _, v in rows}),
        "psi": values,
        "alert": any(v > PSI_ALERT for v in values.values() if not math.isnan(v)),
        "counts": {d: c.tolist() for d, c in hist.counts().items()},
    }
