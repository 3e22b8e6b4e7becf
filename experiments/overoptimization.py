"""A small, honest reward over-optimisation study that runs on a CPU (the gold-reward-model protocol of
Gao et al. 2023 and Coste et al. 2024), with the real r2m.py loop.

1. A synthetic summarisation world. A post is 10 words: 3 distinct *key items* among filler words. The GOLD
   reward plays the human; it is exact and fixed (see `gold_reward`): coverage of the post's key items, minus
   costs for mentioning items the post does not have, for repeated words, for length, and for not finishing.
2. An SFT policy: a tiny GPT-NeoX trained briefly on (post -> a summary listing 1-3 of its items).
3. A PROXY reward model: a tiny GPT-NeoX RM trained on a limited set of preference pairs of SFT samples,
   labelled by the gold reward with 25% label noise. SFT samples rarely repeat words and their length
   correlates with coverage, so the proxy can learn spurious cues (length, item-looking tokens) that gold
   does not reward.
4. RL against the proxy with `r2m.train`, per method (vanilla RLOO / GRPO, +R2M, the R2M ablations, BRME),
   several seeds each. Per step: proxy reward (the frozen proxy's own score), gold reward, KL to the
   reference. At the end: gold reward, and the (final) reward model's accuracy on held-out gold-labelled pairs.

    python experiments/overoptimization.py                          # all methods x 3 seeds (~10 min, 2 cores)
    python experiments/overoptimization.py --quick --output_dir /tmp/q   # pipeline check (~2 min)

Writes steps.csv (every step of every run), summary.csv / summary.json (the table), and overoptimization.png
(gold and proxy reward against KL; needs matplotlib, an optional dependency of this script only).
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

import brme  # noqa: E402
import r2m  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# The world and every hyper-parameter, fixed before any comparison is run
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
# RL: the paper's TL;DR ratios at tiny scale (RM lr = policy lr / 6, as 5e-7 vs 3e-6; Ω = 0.6; α = 0.3).
RL = dict(queries_per_step=16, group_size=4, max_new_tokens=8, temperature=0.7, policy_lr=3e-4, rm_lr=5e-5,
          policy_epochs=2, policy_minibatch_size=32, micro_batch_size=32, forward_batch_size=64,
          generation_batch_size=64, rm_minibatch_groups=8, beta=0.05, clip_eps=0.2, d_attn=32,
          omega_floor=0.6, alpha=0.3, brme_heads=5, brme_lambda=0.4, brme_epochs=10, brme_lr=3e-2)
STEPS, SEEDS = 120, [0, 1, 2]
QUICK = dict(steps=40, seeds=[0])  # same world, fewer RL steps and one seed
# Reporting choices, also fixed in advance: curves are smoothed by a 5-step moving average; "final" is the
# smoothed value at the last step, "best" the maximum of the smoothed gold curve; the proxy-gold gap is in
# units of each reward's spread over the SFT policy's samples (step 0); "gold at matched KL" is the smoothed
# gold reward where the smoothed KL first reaches MATCHED_KL nats.
SMOOTH, MATCHED_KL = 5, 1.0

METHODS = {  # name -> config overrides
    "rloo": dict(algo="rloo", reward="vanilla"),
    "grpo": dict(algo="grpo", reward="vanilla"),
    "rloo+r2m": dict(algo="rloo", reward="r2m"),
    "grpo+r2m": dict(algo="grpo", reward="r2m"),
    "r2m w/o train": dict(algo="rloo", reward="r2m_frozen"),
    "r2m w/ noise": dict(algo="rloo", reward="r2m_noise"),
    "iterative head": dict(algo="rloo", reward="iterative_head"),
    "r2m w/o GRE (α=0)": dict(algo="rloo", reward="r2m", alpha=0.0),
    "r2m w/o BT (α=1)": dict(algo="rloo", reward="r2m", alpha=1.0),
    "brme": dict(algo="rloo", reward="brme"),
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
        ids, mask = r2m.pad_right([p + s for p, s in batch], 0)
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

    ids, mask = r2m.pad_left(prompts, 0)
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
    return r2m.pad_right([p["prompt"] + p[side] for p in pairs], 0)


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
# 4-5. RL per method, with gold reward per step and RM accuracy at the end
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def rm_accuracy(reward_model, policy, mode: r2m.RewardMode, pairs: list[dict], omega: float) -> float:
    """Fraction of held-out gold-labelled pairs the final reward model orders right. R2M variants score with
    feedback from the final policy's hidden states over the same tokens, at ω(T) = Ω."""
    scores = {}
    for side in ("chosen", "rejected"):
        ids, mask = pair_batch(pairs, side)
        rte = reward_model.reward_token_embedding(ids, mask)
        h = h_mask = None
        if mode.feedback:
            h, h_mask = r2m.policy_hidden_states(policy, ids, mask)
            if mode.noise:
                h = r2m.gaussian_like(h, h_mask)
        scores[side] = reward_model.rewards_from_embedding(rte, h, h_mask, omega)
    return (scores["chosen"] > scores["rejected"]).float().mean().item()


def run_method(name: str, seed: int, steps: int, world: dict, out_dir: str) -> list[dict]:
    tokenizer, sft_policy, proxy = world["tokenizer"], world["policy"], world["proxy"]
    overrides = METHODS[name]
    cfg = r2m.R2MConfig(**{**RL, **overrides}, total_trajectories=steps * RL["queries_per_step"] * RL["group_size"],
                        device="cpu", seed=seed, save_every=0, sample_every=0, overwrite=True,
                        output_dir=os.path.join(out_dir, "runs", f"{name}-seed{seed}".replace(" ", "_")))
    policy, ref_policy, rm = copy.deepcopy(sft_policy), copy.deepcopy(sft_policy), copy.deepcopy(proxy)
    mode = r2m.REWARD_MODES[cfg.reward]
    if mode.ensemble:
        reward_model = brme.BRMEReward(rm, num_heads=cfg.brme_heads, lam=cfg.brme_lambda, seed=seed)
        train_pairs = world["train_pairs"]
        brme.fit_brme_heads(reward_model, reward_model.reward_token_embedding(*pair_batch(train_pairs, "chosen")),
                           reward_model.reward_token_embedding(*pair_batch(train_pairs, "rejected")),
                           cfg.brme_epochs, cfg.brme_lr, seed=seed, sigma_prior=cfg.brme_sigma_prior)
    else:
        reward_model = r2m.R2MRewardModel(rm, d_policy=64, d_attn=cfg.d_attn)
    prompt_items = world["prompt_items"]

    def on_step(step, ro, rewards):
        """Gold and frozen-proxy rewards of this step's samples."""
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
        return {"gold": statistics.fmean(golds), "proxy": proxy_scores.mean().item(),
                "gold_std": statistics.pstdev(golds), "proxy_std": proxy_scores.std().item()}

    history = r2m.train(policy, ref_policy, reward_model, tokenizer, world["prompts"], cfg, on_step=on_step)
    acc = rm_accuracy(reward_model, policy, mode, world["heldout_pairs"], r2m.omega(steps - 1, steps, cfg.omega_floor)
                      if mode.feedback else 1.0)
    for h in history:
        h.update(method=name, seed=seed, rm_accuracy=acc)
    return history


def smooth(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(xs))]


def run_summary(history: list[dict]) -> dict:
    gold, proxy, kl = smooth([h["gold"] for h in history]), smooth([h["proxy"] for h in history]), smooth([h["kl/sequence"] for h in history])
    g0, p0 = history[0]["gold"], history[0]["proxy"]
    gs, ps = history[0]["gold_std"] or 1.0, history[0]["proxy_std"] or 1.0
    matched = next((g for g, k in zip(gold, kl) if k >= MATCHED_KL), None)
    return {"final_gold": gold[-1], "best_gold": max(gold), "final_proxy": proxy[-1], "final_kl": kl[-1],
            "gap": (proxy[-1] - p0) / ps - (gold[-1] - g0) / gs, "gold_at_kl": matched,
            "rm_accuracy": history[-1]["rm_accuracy"], "sft_gold": g0}


def mean_spread(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:+.3f}"
    return f"{statistics.fmean(xs):+.3f} ± {statistics.pstdev(xs):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Pipeline check: 40 steps, 1 seed (about 2 minutes).")
    parser.add_argument("--output_dir", default="runs/overoptimization", help="Where steps.csv, summary.* and the plot go.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"error: --methods must come from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    steps, seeds = (QUICK["steps"], QUICK["seeds"]) if args.quick else (STEPS, SEEDS)
    t0 = time.perf_counter()

    # 1-3: the world, the SFT policy, the proxy RM (fixed seed: the same for every method and RL seed)
    rng = random.Random(1234)
    tokenizer = build_tokenizer()
    policy = tiny_lm(tokenizer, seed=0)
    train_sft(policy, tokenizer, rng, WORLD["sft_steps"])
    train_pairs = make_pairs(policy, tokenizer, rng, WORLD["rm_train_pairs"], WORLD["label_noise"])
    heldout_pairs = make_pairs(policy, tokenizer, rng, WORLD["rm_heldout_pairs"], 0.0)
    proxy = tiny_lm(tokenizer, seed=1, classifier=True)
    train_proxy_rm(proxy, train_pairs, rng, WORLD["rm_epochs"])
    with torch.no_grad():
        proxy_acc = (proxy(*pair_batch(heldout_pairs, "chosen")).logits > proxy(*pair_batch(heldout_pairs, "rejected")).logits).float().mean().item()
    posts = [make_post(rng) for _ in range(256)]
    prompts = [tokenizer(prompt_text(w))["input_ids"] for w, _ in posts]
    world = {"tokenizer": tokenizer, "policy": policy, "proxy": proxy, "prompts": prompts,
             "prompt_items": {tuple(p): items for p, (_, items) in zip(prompts, posts)},
             "train_pairs": train_pairs, "heldout_pairs": heldout_pairs}
    print(f"world ready in {time.perf_counter() - t0:.0f}s: proxy RM accuracy on held-out gold pairs {proxy_acc:.3f}")

    # 4-5: RL per method and seed
    histories: dict[str, list[list[dict]]] = {m: [] for m in methods}
    with open(os.path.join(args.output_dir, "steps.csv"), "w", newline="") as f:
        fields = ["method", "seed", "step", "kl/sequence", "gold", "proxy", "reward/mean", "omega", "rm_accuracy"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for seed in seeds:
            for m in methods:
                history = run_method(m, seed, steps, world, args.output_dir)
                writer.writerows(history)
                f.flush()
                histories[m].append(history)
                s = run_summary(history)
                print(f"[{time.perf_counter() - t0:5.0f}s] {m:18s} seed {seed}: gold {s['sft_gold']:+.3f} -> "
                      f"{s['final_gold']:+.3f}, proxy {history[0]['proxy']:+.3f} -> {s['final_proxy']:+.3f}, "
                      f"KL {s['final_kl']:.2f}, RM acc {s['rm_accuracy']:.3f}", flush=True)

    # the table
    rows = []
    for m in methods:
        sums = [run_summary(h) for h in histories[m]]
        rows.append({"method": m, **{k: mean_spread([s[k] for s in sums]) for k in
                                     ["final_gold", "best_gold", "gap", "gold_at_kl", "final_kl", "rm_accuracy"]}})
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"steps": steps, "seeds": seeds, "world": WORLD, "rl": RL, "matched_kl": MATCHED_KL,
            "proxy_heldout_accuracy": proxy_acc, "sft_gold": statistics.fmean(h[0]["gold"] for hs in histories.values() for h in hs),
            "seconds": time.perf_counter() - t0}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"meta": meta, "table": rows}, f, indent=1)
    header = f"| method | final gold | best gold | proxy−gold gap | gold @ KL {MATCHED_KL} | final KL | RM accuracy |"
    print("\n" + header + "\n|" + "---|" * 7)
    for r in rows:
        print(f"| {r['method']} | {r['final_gold']} | {r['best_gold']} | {r['gap']} | {r['gold_at_kl']} | "
              f"{r['final_kl']} | {r['rm_accuracy']} |")
    print(f"\nSFT policy gold reward {meta['sft_gold']:+.3f}; proxy RM held-out accuracy {proxy_acc:.3f}; "
          f"{len(seeds)} seed(s) x {steps} steps; {meta['seconds']:.0f}s")
    plot(histories, os.path.join(args.output_dir, "overoptimization.png"))


def plot(histories: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (steps.csv has every number)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for m, hs in histories.items():
        steps = min(len(h) for h in hs)
        mean = lambda key: smooth([statistics.fmean(h[i][key] for h in hs) for i in range(steps)])  # noqa: E731
        kl = mean("kl/sequence")
        style = "-" if "r2m" in m else ("--" if m in ("rloo", "grpo") else ":")
        axes[0].plot(kl, mean("gold"), style, label=m)
        axes[1].plot(kl, mean("proxy"), style, label=m)
    axes[0].set(title="gold reward (what we want)", xlabel="KL to reference (nats)", ylabel="gold")
    axes[1].set(title="proxy reward (what the policy optimises)", xlabel="KL to reference (nats)", ylabel="proxy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
