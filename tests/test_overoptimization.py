"""The over-optimisation study: the gold reward by hand, and the --quick pipeline with its precondition."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import overoptimization as oo  # noqa: E402


def test_gold_reward_hand_computed():
    items = ["dog", "car", "lamp"]
    assert oo.gold_reward(items, ["dog", "car", "lamp"], True) == pytest.approx(1.0 - 0.05 * 3)
    assert oo.gold_reward(items, ["dog"], True) == pytest.approx(1 / 3 - 0.05)
    # a hallucinated item, a repeat and no EOS all cost
    assert oo.gold_reward(items, ["dog", "dog", "apple"], False) == pytest.approx(1 / 3 - 0.3 - 0.2 - 0.15 - 0.3)
    # the spurious cues a proxy may learn are not rewarded: longer or repeated never beats the exact summary
    assert oo.gold_reward(items, ["dog", "car", "lamp", "lamp", "dog"], True) < oo.gold_reward(items, items, True)


def test_quick_study_runs_and_vanilla_rl_raises_the_proxy(tmp_path):
    out = str(tmp_path / "quick")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "overoptimization.py"), "--quick",
                           "--output_dir", out], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "steps.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(oo.METHODS)
    rloo = [float(r["proxy"]) for r in rows if r["method"] == "rloo"]
    assert len(rloo) == oo.QUICK["steps"]
    # the precondition for studying over-optimisation at all: RL on the proxy raises the proxy
    assert sum(rloo[-5:]) / 5 > sum(rloo[:5]) / 5
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [r["method"] for r in summary["table"]] == list(oo.METHODS)
    assert 0.5 < summary["meta"]["proxy_heldout_accuracy"] < 1.0  # a learned, imperfect proxy
