"""The over-optimisation study: the gold reward and the on-policy agreement by hand, the ω(t)·proxy control,
and the --quick pipeline with its precondition (RL on the proxy raises the proxy)."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import overoptimization as oo  # noqa: E402
from helpers import ENV, LEARNING_SEED, THREADS, learned  # noqa: E402
import r2m  # noqa: E402
from plumbing import data  # noqa: E402


def test_gold_reward_hand_computed():
    items = ["dog", "car", "lamp"]
    assert oo.gold_reward(items, ["dog", "car", "lamp"], True) == pytest.approx(1.0 - 0.05 * 3)
    assert oo.gold_reward(items, ["dog"], True) == pytest.approx(1 / 3 - 0.05)
    # a hallucinated item, a repeat and no EOS all cost
    assert oo.gold_reward(items, ["dog", "dog", "apple"], False) == pytest.approx(1 / 3 - 0.3 - 0.2 - 0.15 - 0.3)
    # the spurious cues a proxy may learn are not rewarded: longer or repeated never beats the exact summary
    assert oo.gold_reward(items, ["dog", "car", "lamp", "lamp", "dog"], True) < oo.gold_reward(items, items, True)


def test_pairwise_agreement_hand_computed():
    # group 1 (K = 3): gold 1 > 0.5 > 0; scores order (0,1) right, (0,2) right, (1,2) wrong -> 2 of 3
    # group 2: gold ties on (0,1) are skipped; (0,2) right, (1,2) a score tie -> 1/2  => (2 + 1 + 0.5) / 5
    scores = [3.0, 1.0, 2.0, 5.0, 4.0, 4.0]
    gold = [1.0, 0.5, 0.0, 1.0, 1.0, 0.0]
    agreement, pairs = oo.pairwise_agreement(scores, gold, group_size=3)
    assert pairs == 5
    assert agreement == pytest.approx(3.5 / 5)
    assert oo.pairwise_agreement([0.0, 1.0], [0.2, 0.2], 2)[1] == 0
    assert math.isnan(oo.pairwise_agreement([0.0, 1.0], [0.2, 0.2], 2)[0])


def test_omega_scaled_control_is_omega_times_the_proxy():
    tokenizer = oo.build_tokenizer()
    proxy = oo.tiny_lm(tokenizer, seed=1, classifier=True)
    control = oo.OmegaScaledProxy(proxy, total_steps=10, floor=0.6)
    ids, mask = data.pad_right([[4, 5, 6, 1], [7, 8, 1]], 0)
    with torch.no_grad():
        own = proxy(input_ids=ids, attention_mask=mask).logits[:, 0]  # the proxy's own reward
        rte = control.reward_token_embedding(ids, mask)
        for step in (0, 3, 9):
            control.step = step
            expected = r2m.omega(step, 10, 0.6) * own
            torch.testing.assert_close(control.rewards_from_embedding(rte), expected, rtol=1e-5, atol=1e-6)
    assert r2m.omega(9, 10, 0.6) == 0.6  # the last step is scaled by Ω, the first by 1


@pytest.mark.learning
def test_quick_study_runs_and_vanilla_rl_raises_the_proxy(tmp_path):
    out = str(tmp_path / "quick")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "overoptimization.py"), "--quick",
                           "--threads", str(THREADS), "--seeds", str(LEARNING_SEED), "--output_dir", out], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "steps.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(oo.METHODS)
    rloo = [r for r in rows if r["method"] == "rloo"]
    assert len(rloo) == oo.QUICK["steps"]
    # the precondition for studying over-optimisation at all: RL on the proxy clearly raises the proxy
    proxy = [float(r["proxy"]) for r in rloo]
    first, last = sum(proxy[:10]) / 10, sum(proxy[-10:]) / 10
    assert learned(last - first, 0.3), (first, last)
    # the study's diagnostics are there: on-policy agreement for every arm, the feedback path's for R2M
    assert all(0.0 <= float(r["agree/used"]) <= 1.0 for r in rows if r["agree/used"] not in ("", "nan"))
    r2m_rows = [r for r in rows if r["method"] == "rloo+r2m"]
    assert float(r2m_rows[-1]["feedback/attn_rel_change"]) > 0.0
    assert r2m_rows[-1]["feedback/reward_var_share"] != "" and rloo[-1]["feedback/reward_var_share"] == ""
    # the control's reward is ω(t)·proxy: at the last step ω = Ω
    control = [r for r in rows if r["method"] == "rloo ω·proxy"]
    assert float(control[-1]["reward/mean"]) == pytest.approx(0.6 * float(control[-1]["proxy"]), rel=1e-4, abs=1e-5)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [r["method"] for r in summary["table"]] == list(oo.METHODS)
    assert 0.5 < summary["meta"]["proxy_heldout_accuracy"] < 1.0  # a learned, imperfect proxy
