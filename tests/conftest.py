"""Shared fixtures: one tiny trained model (and its exported repository) per test session.

Training even the tiny model takes seconds on 2 cores, so it happens once and every test
module that needs artifacts or a Triton repository reuses it. Tests that change a
repository work on a copy of it.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from export.pipeline import TrainSettings, train
from export.ranker import RankerConfig
from export.synth import SynthSpec, synthesize
from export.two_tower import TwoTowerConfig


def pytest_configure(config) -> None:
    """Tests train tiny models: one intra-op thread is faster on a shared 2-core machine and
    makes timings less sensitive to whatever else runs there."""
    torch.set_num_threads(1)


TINY_EXPORT = TrainSettings(
    two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=64, patience=2, lr=5e-3),
    ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
    refit=False,
)
"""Tiny settings: the exported graphs have the real structure at a fraction of the size (no
refit: the export only needs *a* trained model, and a second training doubles the time)."""


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """Artifacts of ``recsys train`` on a 300-user synthetic data set (read-only by convention)."""
    data = tmp_path_factory.mktemp("tiny_data")
    synthesize(SynthSpec(users=300, items=150, ratings=5000, seed=3, span_days=10), data, progress=False)
    out = tmp_path_factory.mktemp("tiny_artifacts")
    # one intra-op thread: on a busy 2-core machine two spinning torch threads made this
    # tiny training 8x slower (175 s vs 22 s measured), and the model is too small to gain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(data, out, TINY_EXPORT, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_repository(tiny_artifacts, tmp_path_factory) -> Path:
    """A model repository with configs generated for the tiny shapes and version 1 exported.

    Also adds the ``export`` section to ``tiny_artifacts/manifest.json``.
    """
    from export.onnx_export import export_repository

    repo = tmp_path_factory.mktemp("tiny_repo") / "model_repository"
    export_repository(tiny_artifacts, repo)
    return repo


@pytest.fixture(scope="module")
def start_triton():
    """Starts real embedded Tritons for a test module; stopped when the module ends.

    Skips the module when the tritonserver binary of the nvidia-pytriton wheel is missing.
    """
    from orchestrator.tritonserver import EmbeddedTriton, TritonError, find_triton

    try:
        find_triton()
    except TritonError as exc:
        pytest.skip(f"embedded Triton unavailable: {exc}")
    with ExitStack() as stack:
        yield lambda repo: stack.enter_context(EmbeddedTriton(repo, startup_timeout=90))


@pytest.fixture
def repo_copy(tiny_repository, tmp_path) -> Path:
    """A writable copy of the tiny repository (tests that publish versions into it)."""
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns("__pycache__", ".staging-*"))
    return repo
