"""FAISS searches under the GPU guard, run on the CPU: the serialised path the GPU takes.

FAISS GPU indexes are not thread-safe, so ``orchestrator/ann.py`` runs every FAISS call on a
GPU index under its device's :class:`SearchGuard`. ``IndexBundle.serialise`` puts a CPU index
on the same path; this test drives it from many threads through ``Catalog.retrieve`` (the
serving call) and checks every FAISS call went through the guard, one at a time.
"""

from __future__ import annotations

import threading

import numpy as np

from orchestrator.ann import SearchGuard, gpu_guard, guard_of
from orchestrator.catalog import Catalog, Filters


def test_searches_are_serialised_through_the_guard(tiny_artifacts):
    catalog = Catalog.load(tiny_artifacts, use_gpu=False)
    bundle = catalog.index
    assert guard_of(bundle.index) is None and bundle.guard is None  # a CPU index: concurrent by default
    bundle.serialise = True
    guard = bundle.guard
    assert isinstance(guard, SearchGuard) and guard is bundle.guard
    rng = np.random.default_rng(0)
    users = rng.normal(size=(64, catalog.vectors.shape[1])).astype(np.float32)
    exclude = catalog.excluded(Filters(), np.arange(5))
    answers: dict[int, np.ndarray] = {}
    start = threading.Barrier(8)

    def worker(w: int) -> None:
        start.wait()
        for i in range(w, len(users), 8):
            items, _ = catalog.retrieve(users[i], 20, None, exclude)
            answers[i] = items

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == len(users)
    assert guard.calls >= len(users) and guard.max_active == 1  # every search inside, one at a time
    bundle.serialise = False
    calls = guard.calls
    for i in (0, 17, 63):  # the serialised answers are the ordinary ones
        assert np.array_equal(catalog.retrieve(users[i], 20, None, exclude)[0], answers[i])
    assert guard.calls == calls  # off again: no lock on the CPU path


def test_one_guard_per_gpu_device():
    assert gpu_guard(0) is gpu_guard(0) and gpu_guard(0) is not gpu_guard(1)
