"""A small, honest reward over-optimisation study that runs on a CPU (the gold-reward-model protocol of
Gao et al. 2023 and Coste et al. 2024), with the real r2m.py loop, designed so that R2M's mechanism is
actually switched on while over-optimisation happens.

1. A synthetic summarisation world. A post is 10 words: 3 distinct *key items* among filler words. The GOLD
   reward plays the human; it is exact and fixed (see `gold_reward`): coverage of the post's key items, minus
   costs for mentioning items the post does not have, for repeated words, for length, and for not finishing.
2. An SFT policy: a tiny GPT-NeoX trained briefly on (post -> a summary listing 1-3 of its items).
3. A PROXY reward model: a tiny GPT-NeoX RM trained on a limited set of preference pairs of SFT samples,
   labelled by the gold reward with 25% label noise. SFT samples rarely repeat words and their length
   correlates with coverage, so the proxy can learn spurious cues (length, item-looking tokens) that gold
   does not reward.
4. RL against the proxy with `r2m.train`, per arm, 5 seeds each. Per step: proxy reward (the frozen proxy's
   own score), gold reward, KL to the reference, and the on-policy within-group pairwise agreement with gold
   of the reward the policy was trained on (and of the frozen proxy, on the same samples); the loop's own
   diagnostics of the feedback path (attn_rel_change, reward_var_share) go to steps.csv too.

    python experiments/overoptimization.py --threads 1                 # the study: 8 arms x 5 seeds
    python experiments/overoptimization.py --quick --output_dir /tmp/q  # pipeline check (< 3 min, 2 cores)
    python experiments/overoptimization.py --build_world --threads 2   # rebuild experiments/world/ (30 s)

Steps 1-3 (the world) are built once and shipped in experiments/world/ (the SFT policy and proxy RM as Hugging
Face folders, the prompts and preference pairs as JSON): training them depends on the CPU's float kernels and
thread count, so a world rebuilt on another machine is another world. Every study run loads the shipped one.

Writes steps.csv (every step of every run), summary.csv / summary.json (the table), and overoptimization.png
(gold-vs-KL frontier, proxy-vs-KL, on-policy agreement and feedback diagnostics per step; needs matplotlib,
an optional dependency of this script only).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import baselines  # noqa: E402, F401  (the noise ablation's row of r2m.REWARD_MODES)
import brme  # noqa: E402, F401  (BRME's row)
import r2m  # noqa: E402
from plumbing import data  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# The world (unchanged from the study's first design)
# ----------------------------------------------------------------------------------------------------

ITEMS = ["apple", "bike", "car", "dog", "cat", "lamp", "phone", "boat", "tree", "chair",
         "book", "shoe", "cake", "train", "clock", "horse"]
FILLER = ["the", "a", "my", "very", "old", "new", "and", "then", "so", "big", "small", "red", "was", "is"]
KEY_ITEMS, POST_WORDS = 3, 10
SPECIALS = ["<pad>", "<eos>", "post:", "tldr:"]

WORLD = dict(
    # gold reward = coverage - 0.3·hallucinated items - 0.2·repeated words - 0.05·length - 0.3·(no EOS)
    hallucination_cost=0.3, repeat_cost=0.2, length_cost=0.05, unfinished_cost=0.3,
    sft_examples=3000, sft_steps=400, sft_lr=3e-3,
    rm_train_pairs=600, rm_heldout_pairs=400, label_noise=0.25, rm_epochs=15, rm_lr=1e-3,
)

# ----------------------------------------------------------------------------------------------------
# The design: every choice below was fixed before any R2M arm (or any other non-vanilla arm) was run.
# Only vanilla RLOO runs (seed 0 unless said) and one measurement on SFT samples informed it:
#
#  V0  The first design (policy lr 3e-4, linear decay, T = 120; results/ of that design): vanilla's gold
#      peaked at steps 1-12 with KL crossing 1 nat at steps 8-11, while ω(t) >= 0.976: the feedback path
#      carried <= 2.4% of the reward while over-optimisation happened. ω reaches Ω = 0.6 only at
#      t = 0.436·T (cos(π t/T) = 0.2), whatever T is.
#  V1  Vanilla RLOO, T = 150, linear decay, policy lr 1e-4 / 3e-5 / 1.5e-5: the smoothed KL follows the
#      cumulative learning rate Σlr (KL ≈ 0.5 nat at Σlr ≈ 1.2e-3, ≈ 1 at ≈ 1.7e-3, ≈ 4.4 at ≈ 4.4e-3) and
#      gold peaks at KL ≈ 0.4-1 (steps 14 / ~60 / ~140). With a linear decay to 0, 68% of a run's Σlr is spent
#      by t = 0.436·T, so a gold peak well after ω reaches Ω leaves almost no drift for over-optimisation
#      (lr 1.5e-5: gold still rising at the end, KL 0.6). -> POLICY_LR_SCHEDULE = constant.
#  V2  Vanilla RLOO, T = 150, constant lr 2e-5 / 3e-5: gold peaks at KL ≈ 0.4-0.6 (steps 47-49, +0.63/+0.64
#      smoothed), then falls to +0.53 / +0.46 at the end (KL 2.5 / 4.4): over-optimisation is clear. For the
#      peak to fall at ≈ 0.55-0.6·T (steps 80-90, ω = Ω from step 66) Σlr must reach ≈ 1.2e-3 there:
#      -> policy lr 1.5e-5 constant, T = 150 (end: Σlr = 2.25e-3, KL ≈ 2 nats, past the peak).
#  V3  The check of V2's choice, vanilla RLOO at constant lr 1.5e-5, T = 150, seeds 1 and 2: the smoothed gold
#      rises to a plateau from about step 40 to 110 (peaks +0.646 / +0.625 at steps 76 / 67), the smoothed KL
#      crosses 1 nat at steps ~100, and gold then falls to +0.537 / +0.533 at step 150 (KL 1.8 / 1.7). So the
#      over-optimisation (gold falling while KL grows past 1 nat) happens at steps ~100-150, all with ω = Ω.
#  G   The GREBT budget, from SFT samples and the untrained head only (no R2M run): on 64 prompts x 4 SFT
#      samples the proxy's within-group reward std is 0.54 (0.32 after the x Ω of Eq. 4), while the untrained
#      feedback term (1 - Ω)·w·Ĥ has a within-group std of 0.002-0.004 (3 init seeds): ~100x too small to
#      reorder a group. The chain W_v -> W_o -> φ must gain ~100 ≈ 4.6³, i.e. each matrix must move by a few
#      times its own size (init rms 0.07-0.10). AdamW moves a weight by at most ≈ lr per optimiser step, so
#      Σ rm_lr over the run must be >= ~0.3: rm_lr 1.5e-4 x (150 steps x 4 GREBT epochs x 4 minibatches of
#      4 groups = 2,400 steps) = 0.36. (The paper's TL;DR run: 5e-7 x 122 steps x 64 minibatches ≈ 0.004
#      per weight against an init rms of ≈ 0.011 at d = 2048, i.e. ~0.3 relative, halved by its lr decay.)
#      The realised movement is logged every step (feedback/attn_rel_change).
# ----------------------------------------------------------------------------------------------------

RL = dict(queries_per_step=16, group_size=4, max_new_tokens=8, temperature=0.7,
          policy_lr=1.5e-5, lr_schedule="constant",  # V1-V3
          rm_lr=1.5e-4, rm_epochs=4, rm_minibatch_groups=4,  # G
          policy_epochs=2, policy_minibatch_size=32, micro_batch_size=32, forward_batch_size=64,
          generation_batch_size=64, beta=0.05, clip_eps=0.2, d_attn=32,
          omega_floor=0.6, alpha=0.3, brme_heads=5, brme_lambda=0.4, brme_epochs=10, brme_lr=3e-2)
STEPS, SEEDS = 150, [0, 1, 2, 3, 4]
# --quick is a pipeline check, not the study: 1 seed, 40 steps, and a policy lr at which 40 steps of RL on
# the proxy clearly raise the proxy (what its test asserts); every other setting as in the study.
QUICK = dict(steps=40, seeds=[0], policy_lr=3e-4)
# Reporting choices, also fixed in advance: curves are smoothed by a 5-step moving average; "final" is the
# smoothed value at the last step, "best" the maximum of the smoothed gold curve (and its step); "gold @ KL k"
# is the smoothed gold where the smoothed KL first reaches k nats (n/a for a run that never does); "late" means
# the steps with ω(t) = Ω (t >= 0.436·T), where R2M's feedback path has its full weight.
SMOOTH, MATCHED_KL = 5, (0.5, 1.0)

METHODS = {  # name -> config overrides (+ "omega_scaled": the ω(t)·proxy control)
    "rloo": dict(algo="rloo", reward="vanilla"),
    "rloo ω·proxy": dict(algo="rloo", reward="vanilla", omega_scaled=True),
    "rloo+r2m": dict(algo="rloo", reward="r2m"),
    "r2m w/o train": dict(algo="rloo", reward="r2m_frozen"),
    "r2m w/ noise": dict(algo="rloo", reward="r2m_noise"),
    "brme": dict(algo="rloo", reward="brme"),
    "grpo": dict(algo="grpo", reward="vanilla"),
    "grpo+r2m": dict(algo="grpo", reward="r2m"),
}


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + ITEMS + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_post(rng: random.Random) -> tuple[list[str], list[str]]:
    """-> (the post's words, its key items in order of appearance)."""
    words = rng.sample(ITEMS, KEY_ITEMS) + [rng.choice(FILLER) for _ in range(POST_WORDS - KEY_ITEMS)]
    rng.shuffle(words)
    return words, [w for w in words if w in ITEMS]


def prompt_text(words: list[str]) -> str:
    return "post: " + " ".join(words) + " tldr:"


def gold_reward(items: list[str], response: list[str], finished: bool) -> float:
    """The human stand-in: exact, fixed. `response`: the response's words (EOS excluded)."""
    key = set(items)
    covered = len({w for w in response if w in key}) / KEY_ITEMS
    hallucinated = len({w for w in response if w in ITEMS and w not in key})
    repeats = len(response) - len(set(response))
    return (covered - WORLD["hallucination_cost"] * hallucinated - WORLD["repeat_cost"] * repeats
            - WORLD["length_cost"] * len(response) - (0.0 if finished else WORLD["unfinished_cost"]))


def sft_summary(items: list[str], rng: random.Random) -> list[str]:
    """'Reasonable' human-written summaries of varying quality: 1-3 of the items, sometimes a filler word."""
    k = rng.choices([3, 2, 1], weights=[0.5, 0.3, 0.2])[0]
    summary = sorted(rng.sample(items, k), key=items.index)
    if rng.random() < 0.3:
        summary.insert(0, rng.choice(FILLER))
    return summary


def tiny_lm(tokenizer, seed: int, classifier: bool = False):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                           bos_token_id=1, num_labels=1, hidden_dropout=0.0, attention_dropout=0.0,
                           tie_word_embeddings=False)
    return (GPTNeoXForSequenceClassification if classifier else GPTNeoXForCausalLM)(config)


# ----------------------------------------------------------------------------------------------------
# 2-3. SFT policy and proxy RM
# ----------------------------------------------------------------------------------------------------


def train_sft(policy, tokenizer, rng: random.Random, steps: int) -> None:
    data = []
    for _ in range(WORLD["sft_examples"]):
        words, items = make_post(rng)
        p = tokenizer(prompt_text(words))["input_ids"]
        s = tokenizer(" ".join(sft_summary(items, rng)))["input_ids"] + [tokenizer.eos_token_id]
        data.append((p, s))
    opt = torch.optim.AdamW(policy.parameters(), lr=WORLD["sft_lr"], weight_decay=0.0)
    policy.train()
    for step in range(steps):
        batch = [data[rng.randrange(len(data))] for _ in range(64)]
        ids, mask = data.pad_right([p + s for p, s in batch], 0)
        labels = ids.masked_fill(mask == 0, -100)
        for i, (p, _) in enumerate(batch):
            labels[i, : len(p)] = -100  # learn the summary, not the post
        loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()


@torch.no_grad()
def sample(policy, tokenizer, prompts: list[list[int]], temperature: float) -> list[tuple[list[int], bool]]:
    """One response per prompt -> (response ids without EOS, finished with EOS?)."""
    from transformers import GenerationConfig

    ids, mask = data.pad_left(prompts, 0)
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0,
                          eos_token_id=1, max_new_tokens=RL["max_new_tokens"])
    out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:]
    result = []
    for row in out.tolist():
        finished = 1 in row
        result.append((row[: row.index(1)] if finished else row, finished))
    return result


def make_pairs(policy, tokenizer, rng: random.Random, n: int, noise: float) -> list[dict]:
    """Preference pairs of two SFT samples for the same post, labelled by gold (ties dropped), `noise` flipped."""
    pairs = []
    while len(pairs) < n:
        posts = [make_post(rng) for _ in range(128)]
        prompts = [tokenizer(prompt_text(w))["input_ids"] for w, _ in posts]
        a, b = sample(policy, tokenizer, prompts, 1.0), sample(policy, tokenizer, prompts, 1.0)
        for (words, items), p, ra, rb in zip(posts, prompts, a, b):
            ga = gold_reward(items, tokenizer.convert_ids_to_tokens(ra[0]), ra[1])
            gb = gold_reward(items, tokenizer.convert_ids_to_tokens(rb[0]), rb[1])
            if ga == gb or len(pairs) >= n:
                continue
            chosen, rejected = (ra, rb) if ga > gb else (rb, ra)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
            with_eos = lambda r: r[0] + ([1] if r[1] else [])  # noqa: E731
            pairs.append({"prompt": p, "chosen": with_eos(chosen), "rejected": with_eos(rejected),
                          "prompt_text": prompt_text(words), "items": items})
    return pairs


def pair_batch(pairs: list[dict], side: str):
    return data.pad_right([p["prompt"] + p[side] for p in pairs], 0)


def train_proxy_rm(rm, pairs: list[dict], rng: random.Random, epochs: int) -> None:
    opt = torch.optim.AdamW(rm.parameters(), lr=WORLD["rm_lr"], weight_decay=0.0)
    rm.train()
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for s in range(0, len(order), 32):
            batch = [pairs[i] for i in order[s : s + 32]]
            (cw, mw), (cl, ml) = pair_batch(batch, "chosen"), pair_batch(batch, "rejected")
            rw = rm(input_ids=cw, attention_mask=mw).logits[:, 0]
            rl = rm(input_ids=cl, attention_mask=ml).logits[:, 0]
            loss = r2m.bradley_terry_loss(rw, rl)
            opt.zero_grad()
            loss.backward()
            opt.step()
    rm.eval()


# ----------------------------------------------------------------------------------------------------
# 4. RL per arm: the control reward, the on-policy diagnostic, RM accuracy at the end
# ----------------------------------------------------------------------------------------------------


class OmegaScaledProxy(r2m.R2MRewardModel):
    """Control arm: vanilla RL on ω(t)·proxy, ω(t) the schedule of Eq. 4.

    After ω reaches Ω, R2M's reward is Ω·(proxy) plus the feedback term; with RLOO's unnormalised advantages
    the factor Ω alone acts like a larger β. This arm has the factor and nothing else, so the difference
    R2M - this arm is what the feedback path and GREBT add. The loop scores vanilla arms at ω = 1; `step` is
    the RL step being annotated, advanced by the study's on_step after every step."""

    def __init__(self, reward_model, total_steps: int, floor: float):
        super().__init__(reward_model, d_policy=1, d_attn=1)  # an R2M reward model whose feedback path is never used
        self.total_steps, self.floor, self.step = total_steps, floor, 0

    def reward_parts(self, h_last, h=None, h_mask=None, omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D_rm) -> ω(step)·proxy (B,), and no feedback part; h and the loop's ω are ignored."""
        proxy = self.reward_model.score(h_last.to(self.reward_model.score.weight.dtype)).squeeze(-1).float()
        rewards = r2m.omega(self.step, self.total_steps, self.floor) * proxy
        return rewards, torch.zeros_like(rewards)


def pairwise_agreement(scores: list[float], gold: list[float], group_size: int) -> tuple[float, int]:
    """Within each group of `group_size` consecutive samples, over the pairs whose gold rewards differ: the
    fraction that `scores` orders the same way as gold (a tie in `scores` counts 1/2).
    -> (agreement, number of such pairs); agreement is NaN when no pair's gold differs."""
    agree, pairs = 0.0, 0
    for g in range(0, len(gold), group_size):
        for i in range(g, g + group_size):
            for j in range(i + 1, g + group_size):
                if gold[i] == gold[j]:
                    continue
                pairs += 1
                d = (scores[i] - scores[j]) * (gold[i] - gold[j])
                agree += 1.0 if d > 0 else (0.5 if d == 0 else 0.0)
    return (agree / pairs if pairs else math.nan), pairs


@torch.no_grad()
def rm_accuracy(reward_model, policy, mode: r2m.RewardMode, pairs: list[dict], omega: float) -> float:
    """Fraction of held-out gold-labelled pairs (SFT samples) the final reward model orders right. R2M variants
    score with feedback from the final policy's hidden states over the same tokens, at ω(T) = Ω."""
    scores = {}
    for side in ("chosen", "rejected"):
        ids, mask = pair_batch(pairs, side)
        rte = reward_model.reward_token_embedding(ids, mask)
        h = h_mask = None
        if mode.sees_policy:  # (the noise ablation's reward model replaces h by noise itself)
            h, h_mask = r2m.policy_hidden_states(policy, ids, mask)
        scores[side] = reward_model.rewards_from_embedding(rte, h, h_mask, omega)
    return (scores["chosen"] > scores["rejected"]).float().mean().item()


def build_reward_model(name: str, cfg: r2m.R2MConfig, proxy, world: dict):
    """The arm's reward model around (a copy of) the frozen proxy."""
    mode = r2m.REWARD_MODES[cfg.reward]
    if METHODS[name].get("omega_scaled"):
        return OmegaScaledProxy(proxy, cfg.total_steps, cfg.omega_floor)
    # BRME's heads are fitted by r2m.train, before RL, on the proxy's own training pairs
    return mode.reward_model.build(proxy, cfg, d_policy=64)


def run_method(name: str, seed: int, steps: int, world: dict, out_dir: str, rl: dict = RL) -> list[dict]:
    tokenizer, sft_policy = world["tokenizer"], world["policy"]
    overrides = {k: v for k, v in METHODS[name].items() if k != "omega_scaled"}
    cfg = r2m.R2MConfig(**{**rl, **overrides}, total_trajectories=steps * rl["queries_per_step"] * rl["group_size"],
                        device="cpu", seed=seed, save_every=0, sample_every=0, overwrite=True,
                        output_dir=os.path.join(out_dir, "runs", f"{name}-seed{seed}".replace(" ", "_")))
    policy, ref_policy, rm = copy.deepcopy(sft_policy), copy.deepcopy(sft_policy), copy.deepcopy(world["proxy"])
    mode = r2m.REWARD_MODES[cfg.reward]
    reward_model = build_reward_model(name, cfg, rm, world)
    prompt_items = world["prompt_items"]

    def on_step(step, ro, rewards):
        """Gold and frozen-proxy rewards of this step's samples, and how well the reward the policy was
        trained on (and the frozen proxy) order each group's samples the way gold does."""
        golds = []
        P = ro.prompt_len
        for row in range(ro.query_responses.shape[0]):
            resp = ro.query_responses[row, P:][ro.response_mask[row].bool()].tolist()
            finished = bool(resp) and resp[-1] == 1
            words = tokenizer.convert_ids_to_tokens(resp[:-1] if finished else resp)
            key = tuple(ro.query_responses[row, :P][ro.attention_mask[row, :P].bool()].tolist())
            golds.append(gold_reward(prompt_items[key], words, finished))
        with torch.no_grad():  # the proxy's own, untouched score head on the cached reward-token embeddings
            proxy_scores = rm.score(ro.reward_token_embedding.to(rm.score.weight.dtype)).squeeze(-1)
        if isinstance(reward_model, OmegaScaledProxy):
            reward_model.step = step + 1  # the next annotation is step + 1's
        agree_used, pairs = pairwise_agreement(rewards.tolist(), golds, cfg.group_size)
        agree_proxy, _ = pairwise_agreement(proxy_scores.tolist(), golds, cfg.group_size)
        return {"gold": statistics.fmean(golds), "proxy": proxy_scores.mean().item(),
                "gold_std": statistics.pstdev(golds), "proxy_std": proxy_scores.std().item(),
                "agree/used": agree_used, "agree/proxy": agree_proxy, "agree/pairs": pairs}

    pairs = world["train_pairs"]
    preferences = (pair_batch(pairs, "chosen"), pair_batch(pairs, "rejected")) if mode.fit_on else None
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, world["prompts"], cfg, on_step=on_step,
                        preferences=preferences)
    acc = rm_accuracy(reward_model, policy, mode, world["heldout_pairs"], r2m.omega(steps - 1, steps, cfg.omega_floor)
                      if mode.sees_policy else 1.0)
    for h in history:
        h.update(method=name, seed=seed, rm_accuracy=acc)
    return history


# ----------------------------------------------------------------------------------------------------
# 5. Summaries, the table, the plot
# ----------------------------------------------------------------------------------------------------


def smooth(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(xs))]


def nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else math.nan


def first_full_weight_step(steps: int, floor: float) -> int:
    """The first t with ω(t) = Ω: where 'late' starts."""
    return next(t for t in range(steps) if r2m.omega(t, steps, floor) == floor)


def run_summary(history: list[dict]) -> dict:
    gold, proxy, kl = (smooth([h[k] for h in history]) for k in ("gold", "proxy", "kl/sequence"))
    late = history[first_full_weight_step(len(history), RL["omega_floor"]):]
    best = max(range(len(gold)), key=gold.__getitem__)
    out = {"final_gold": gold[-1], "best_gold": gold[best], "best_step": best, "final_proxy": proxy[-1],
           "final_kl": kl[-1], "sft_gold": history[0]["gold"], "rm_accuracy": history[-1]["rm_accuracy"],
           "agree_used_late": nanmean(h["agree/used"] for h in late),
           "agree_proxy_late": nanmean(h["agree/proxy"] for h in late),
           "attn_change": history[-1].get("feedback/attn_rel_change"),
           "var_share_late": nanmean(h.get("feedback/reward_var_share") for h in late)}
    for k in MATCHED_KL:
        out[f"gold_at_kl{k}"] = next((g for g, x in zip(gold, kl) if x >= k), None)
    return out


TABLE = [  # (summary key, column title, format)
    ("final_gold", "final gold", "+.3f"), ("best_gold", "best gold", "+.3f"), ("best_step", "best-gold step", ".0f"),
    *[(f"gold_at_kl{k}", f"gold @ KL {k}", "+.3f") for k in MATCHED_KL],
    ("final_kl", "final KL", ".2f"), ("agree_used_late", "agreement, reward used (late)", ".3f"),
    ("agree_proxy_late", "agreement, proxy (late)", ".3f"), ("attn_change", "attn ‖Δθ‖/‖θ₀‖ (final)", ".3f"),
    ("var_share_late", "feedback var share (late)", ".3f"), ("rm_accuracy", "held-out RM accuracy", ".3f"),
]


def mean_spread(xs: list, fmt: str) -> str:
    """mean ± std (population) over the runs that have the value; '(k/n)' when only k of n runs do."""
    have = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not have:
        return "n/a"
    text = f"{statistics.fmean(have):{fmt}}" if len(have) == 1 else \
        f"{statistics.fmean(have):{fmt}} ± {statistics.pstdev(have):{fmt.lstrip('+')}}"
    return text if len(have) == len(xs) else f"{text} ({len(have)}/{len(xs)})"


WORLD_DIR = os.path.join(ROOT, "experiments", "world")  # the shipped world: SFT policy, proxy RM, pairs, prompts


def build_world() -> dict:
    """1-3: the world, the SFT policy, the proxy RM (fixed seed: the same for every arm and RL seed).

    Training them on a CPU depends on its float kernels and thread count (reduction order), so a world built on
    another machine is a slightly different world. The study therefore builds it once (`--build_world`), ships
    it in experiments/world/, and every run loads that (`load_world`)."""
    rng = random.Random(1234)
    tokenizer = build_tokenizer()
    policy = tiny_lm(tokenizer, seed=0)
    train_sft(policy, tokenizer, rng, WORLD["sft_steps"])
    train_pairs = make_pairs(policy, tokenizer, rng, WORLD["rm_train_pairs"], WORLD["label_noise"])
    heldout_pairs = make_pairs(policy, tokenizer, rng, WORLD["rm_heldout_pairs"], 0.0)
    proxy = tiny_lm(tokenizer, seed=1, classifier=True)
    train_proxy_rm(proxy, train_pairs, rng, WORLD["rm_epochs"])
    posts = [make_post(rng) for _ in range(256)]
    prompts = [tokenizer(prompt_text(w))["input_ids"] for w, _ in posts]
    return {"tokenizer": tokenizer, "policy": policy, "proxy": proxy, "prompts": prompts,
            "prompt_items": [items for _, items in posts], "train_pairs": train_pairs, "heldout_pairs": heldout_pairs}


def proxy_accuracy(world: dict) -> float:
    """The proxy RM's accuracy on the held-out, noise-free gold pairs."""
    proxy, pairs = world["proxy"], world["heldout_pairs"]
    with torch.no_grad():
        return (proxy(*pair_batch(pairs, "chosen")).logits > proxy(*pair_batch(pairs, "rejected")).logits).float().mean().item()


def save_world(world: dict, folder: str, built_on: str) -> None:
    """The world as files: two Hugging Face model folders and one JSON of prompts and pairs (about 1 MB)."""
    os.makedirs(folder, exist_ok=True)
    world["policy"].save_pretrained(os.path.join(folder, "sft_policy"))
    world["proxy"].save_pretrained(os.path.join(folder, "proxy_rm"))
    data = {k: world[k] for k in ("prompts", "prompt_items", "train_pairs", "heldout_pairs")}
    data["built_on"] = built_on
    data["proxy_heldout_accuracy"] = proxy_accuracy(world)
    with open(os.path.join(folder, "world.json"), "w") as f:
        json.dump(data, f)


def load_world(folder: str = WORLD_DIR) -> tuple[dict, float]:
    """The shipped world -> (world, proxy RM accuracy on held-out gold pairs)."""
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    path = os.path.join(folder, "world.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no world in {folder}; build one with --build_world")
    with open(path) as f:
        data = json.load(f)
    world = {**data, "tokenizer": build_tokenizer(),
             "policy": GPTNeoXForCausalLM.from_pretrained(os.path.join(folder, "sft_policy")).eval(),
             "proxy": GPTNeoXForSequenceClassification.from_pretrained(os.path.join(folder, "proxy_rm")).eval()}
    world["prompt_items"] = {tuple(p): items for p, items in zip(world["prompts"], world["prompt_items"])}
    return world, proxy_accuracy(world)


STEP_FIELDS = ["method", "seed", "step", "omega", "kl/sequence", "kl/token", "gold", "proxy", "reward/mean",
               "agree/used", "agree/proxy", "agree/pairs", "feedback/attn_rel_change", "feedback/reward_var_share",
               "rm/grebt", "rm_accuracy", "time/step"]


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Pipeline check: every arm, 1 seed, 40 steps at a larger policy lr (under 3 minutes).")
    parser.add_argument("--output_dir", default="runs/overoptimization", help="Where steps.csv, summary.* and the plot go.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (1 on a shared machine).")
    parser.add_argument("--seeds", default=None,
                        help="Comma-separated RL seeds (default: 0-4, or 0 with --quick).")
    parser.add_argument("--from_steps", default=None,
                        help="Only rebuild summary.* and the plot in --output_dir from this steps.csv (no training).")
    parser.add_argument("--world", default=WORLD_DIR, help="Folder of the world (SFT policy, proxy RM, pairs) to study.")
    parser.add_argument("--build_world", action="store_true",
                        help="Train the SFT policy and proxy RM from scratch and write them to --world (then stop).")
    args = parser.parse_args()
    if args.build_world:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        built_on = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, --threads {args.threads}"
        save_world(build_world(), args.world, built_on)
        print(f"wrote the world to {args.world} in {time.perf_counter() - t0:.0f}s ({built_on})")
        return
    if args.from_steps:
        histories = histories_from_steps_csv(args.from_steps)
        steps = len(next(iter(histories.values()))[0])
        os.makedirs(args.output_dir, exist_ok=True)
        report(histories, {"steps": steps, "rl": RL, "from_steps": args.from_steps,
                           "omega_floor_from_step": first_full_weight_step(steps, RL["omega_floor"])}, args.output_dir)
        return
    methods = [m.strip() for m in args.methods.split(",")]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"error: --methods must come from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    steps, seeds = (QUICK["steps"], QUICK["seeds"]) if args.quick else (STEPS, SEEDS)
    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise SystemExit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    rl = {**RL, "policy_lr": QUICK["policy_lr"]} if args.quick else RL
    t0 = time.perf_counter()

    world, proxy_acc = load_world(args.world)
    print(f"world from {args.world} (built on {world['built_on']}): proxy RM accuracy on held-out gold pairs "
          f"{proxy_acc:.3f}")
    t_full = first_full_weight_step(steps, rl["omega_floor"])
    print(f"{steps} steps; ω(t) = Ω = {rl['omega_floor']} from step {t_full}")

    # 4: RL per arm and seed, every step written as it finishes
    histories: dict[str, list[list[dict]]] = {m: [] for m in methods}
    run_seconds: list[float] = []
    with open(os.path.join(args.output_dir, "steps.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STEP_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for seed in seeds:
            for m in methods:
                t_run = time.perf_counter()
                history = run_method(m, seed, steps, world, args.output_dir, rl)
                run_seconds.append(time.perf_counter() - t_run)
                writer.writerows(history)
                f.flush()
                histories[m].append(history)
                s = run_summary(history)
                print(f"[{time.perf_counter() - t0:5.0f}s] {m:14s} seed {seed}: gold {s['sft_gold']:+.3f} -> "
                      f"{s['final_gold']:+.3f} (best {s['best_gold']:+.3f} at step {s['best_step']}), proxy "
                      f"{history[0]['proxy']:+.3f} -> {s['final_proxy']:+.3f}, KL {s['final_kl']:.2f}, agreement "
                      f"late {s['agree_used_late']:.3f} (proxy {s['agree_proxy_late']:.3f}), {run_seconds[-1]:.0f}s",
                      flush=True)

    # 5: the table and the plot
    meta = {"steps": steps, "seeds": seeds, "world": WORLD, "rl": rl, "matched_kl": MATCHED_KL,
            "omega_floor_from_step": t_full, "proxy_heldout_accuracy": proxy_acc,
            "seconds": time.perf_counter() - t0, "seconds_per_run_mean": statistics.fmean(run_seconds),
            "threads": args.threads, "world_built_on": world["built_on"]}
    report(histories, meta, args.output_dir)


def report(histories: dict[str, list[list[dict]]], meta: dict, output_dir: str) -> None:
    """summary.csv / summary.json (mean ± std over seeds per arm), the table on stdout, and the plot."""
    rows = []
    for m, hs in histories.items():
        sums = [run_summary(h) for h in hs]
        rows.append({"method": m, "seeds": len(hs), **{k: mean_spread([s[k] for s in sums], fmt) for k, _, fmt in TABLE}})
    with open(os.path.join(output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta["sft_gold"] = statistics.fmean(h[0]["gold"] for hs in histories.values() for h in hs)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump({"meta": meta, "table": rows}, f, indent=1)
    print("\n| method | seeds | " + " | ".join(title for _, title, _ in TABLE) + " |\n|" + "---|" * (len(TABLE) + 2))
    for r in rows:
        print(f"| {r['method']} | {r['seeds']} | " + " | ".join(r[k] for k, _, _ in TABLE) + " |")
    print(f"\nSFT policy gold reward {meta['sft_gold']:+.3f}; proxy RM held-out accuracy "
          f"{meta.get('proxy_heldout_accuracy')}; {meta['steps']} steps; late = steps >= {meta['omega_floor_from_step']}; "
          f"{meta.get('seconds') or 0:.0f}s ({meta.get('seconds_per_run_mean') or 0:.0f}s per run)")
    plot(histories, meta["omega_floor_from_step"], os.path.join(output_dir, "overoptimization.png"))


def histories_from_steps_csv(path: str) -> dict[str, list[list[dict]]]:
    """steps.csv -> {arm: [one run's per-step records, per seed]}, numbers as floats and empty cells as None
    (the table and plot of a study that was stopped early, or re-plotted)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            record = {k: (v if k == "method" else (float(v) if v != "" else None)) for k, v in row.items()}
            runs.setdefault((row["method"], row["seed"]), []).append(record)
    longest = max(len(h) for h in runs.values())
    histories: dict[str, list[list[dict]]] = {}
    for (m, _), h in runs.items():
        if len(h) == longest:  # a run cut off mid-way is left out
            histories.setdefault(m, []).append(h)
    return histories


def plot(histories: dict, t_full: int, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (steps.csv has every number)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for i, (m, hs) in enumerate(histories.items()):
        steps = min(len(h) for h in hs)
        mean = lambda key: smooth([nanmean(h[i].get(key) for h in hs) for i in range(steps)])  # noqa: E731
        kl = mean("kl/sequence")
        look = dict(color=f"C{i}", ls="-" if "r2m" in m else ("--" if m in ("rloo", "grpo") else ":"))
        axes[0, 0].plot(kl, mean("gold"), **look, label=m)
        axes[0, 1].plot(kl, mean("proxy"), **look, label=m)
        axes[1, 0].plot(mean("agree/used"), **look, label=m)
        if hs[0][0].get("feedback/attn_rel_change") is not None:
            axes[1, 1].plot(mean("feedback/reward_var_share"), color=f"C{i}", label=f"{m}: feedback var share")
            axes[1, 1].plot(mean("feedback/attn_rel_change"), color=f"C{i}", ls="--", label=f"{m}: attn ‖Δθ‖/‖θ₀‖")
    for ax in axes[1]:
        ax.axvline(t_full, color="grey", lw=0.8)
        ax.text(t_full, ax.get_ylim()[1], " ω = Ω", va="top", fontsize=8, color="grey")
    axes[0, 0].set(title="gold reward vs KL: the frontier (mean over seeds)", xlabel="KL to reference (nats)", ylabel="gold")
    axes[0, 1].set(title="proxy reward (what vanilla optimises)", xlabel="KL to reference (nats)", ylabel="proxy")
    axes[1, 0].set(title="on-policy within-group agreement with gold of the reward used", xlabel="step",
                   ylabel="fraction of pairs ordered as gold")
    axes[1, 1].set(title="R2M feedback path: variance share and weight change", xlabel="step")
    axes[0, 1].legend(fontsize=7)
    axes[1, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
