"""The arrows point one way: the online side imports nothing from the offline side."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from export.history import Histories
from orchestrator.contract import PAD_ITEM, history_window, history_windows

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ("export", "benchmarks", "clients")
TRAINING_STACK = ("torch", "lightgbm", "hummingbird", "sklearn", "onnxscript")


def test_service_imports_no_training_stack_in_a_fresh_interpreter():
    code = (
        "import json, sys\n"
        "import orchestrator.service, orchestrator.stack, orchestrator.deployment, orchestrator.catalog\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {*TRAINING_STACK, *OFFLINE}, sorted(loaded & {*TRAINING_STACK, *OFFLINE})


def test_orchestrator_source_imports_nothing_offline():
    # also catches imports inside functions, which the fresh interpreter above would not run
    offenders = []
    for path in sorted((ROOT / "orchestrator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in (*OFFLINE, *TRAINING_STACK)]
    assert not offenders, offenders


def test_one_history_window_for_training_and_serving():
    # two users' time-ordered interactions, flat, as Histories stores them
    items = np.array([5, 6, 7, 1, 2, 3, 4, 9], np.int64)
    ratings = np.arange(1, 9, dtype=np.float32)
    store = Histories(user_ids=np.array([10, 20]), offsets=np.array([0, 3, 8]), items=items, ratings=ratings, timestamps=np.arange(8))
    train_items, train_ratings = store.last(np.array([10, 20, 99]), 4)
    for row, (a, b) in enumerate([(0, 3), (3, 8)]):
        serve_items, serve_ratings = history_window(items[a:b], ratings[a:b], 4)
        np.testing.assert_array_equal(serve_items, train_items[row])
        np.testing.assert_array_equal(serve_ratings, train_ratings[row])
    np.testing.assert_array_equal(train_items[0], [PAD_ITEM, 5, 6, 7])  # left padding, most recent last
    np.testing.assert_array_equal(train_items[1], [2, 3, 4, 9])  # only the last L
    assert (train_items[2] == PAD_ITEM).all() and (train_ratings[2] == 0).all()  # unknown user
    empty_items, empty_ratings = history_windows(np.zeros(0, np.int64), np.zeros(0), np.zeros(2, np.int64), np.zeros(2, np.int64), 3)
    assert empty_items.shape == (2, 3) and (empty_items == PAD_ITEM).all() and empty_ratings.dtype == np.float32
