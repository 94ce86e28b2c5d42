"""A data set without ``users.csv`` (ml-latest-small, ml-25m, ml-32m) trains, scores and serves.

Every user then gets the "unknown" demographic codes (zeros), offline and online alike.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_EXPORT

from export.batch_score import BatchScoreError, load_demographics, load_user_data, user_windows
from export.pipeline import train
from export.synth import SynthSpec, synthesize
from orchestrator.catalog import load_demographics as serving_demographics


@pytest.fixture(scope="module")
def no_users(tmp_path_factory):
    data = tmp_path_factory.mktemp("no_users_data")
    synthesize(SynthSpec(users=120, items=60, ratings=2000, seed=5, span_days=10), data, progress=False)
    users_csv = (data / "users.csv").read_text()
    (data / "users.csv").unlink()
    out = tmp_path_factory.mktemp("no_users_artifacts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(data, out, TINY_EXPORT, progress=False)
    finally:
        torch.set_num_threads(threads)
    return data, out, users_csv


def test_training_without_users_csv_has_only_the_unknown_codes(no_users) -> None:
    _, out, _ = no_users
    ckpt = torch.load(out / "two_tower.pt", map_location="cpu", weights_only=True)
    assert tuple(ckpt["demo_cardinalities"])[2] == 1  # occupation: the "unknown" code only
    assert json.loads((out / "demographics.json").read_text()) == {"occupations": []}


def test_batch_scoring_and_serving_give_every_user_zeros(no_users) -> None:
    data, out, _ = no_users
    demo = load_demographics(out, data)
    assert len(demo.user_ids) == 0
    user_data = load_user_data(out, data)
    users = user_data.histories.user_ids[:5]
    inputs, _, _ = user_windows(user_data, users, 10)
    assert inputs["demographics"].shape == (5, 3) and not inputs["demographics"].any()
    manifest = json.loads((out / "manifest.json").read_text())
    assert serving_demographics(out, manifest) is None


def test_a_users_csv_added_after_training_is_refused_not_misread(no_users, tmp_path) -> None:
    data, out, users_csv = no_users
    with_users = tmp_path / "data"
    with_users.mkdir()
    for name in ("ratings.csv", "movies.csv"):
        (with_users / name).write_bytes((data / name).read_bytes())
    (with_users / "users.csv").write_text(users_csv)
    with pytest.raises(BatchScoreError, match="differ from the training vocabulary"):
        load_demographics(out, with_users)
