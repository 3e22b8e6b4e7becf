"""Our vanilla GRPO loop against TRL's GRPOTrainer, same work, on CPU.

Same tiny policy and RM (saved to folders first: TRL rebuilds its reference model from the policy's
`config._name_or_path` when beta > 0), same prompts, group size, completion length, temperature, epochs per
generation batch, minibatch, learning rate, β and ε, and the same number of RL steps (one RL step = one
generation batch of n·K completions followed by k epochs of minibatch updates; in TRL terms
generation_batch_size = n·K, num_iterations = k, steps_per_generation = n·K / minibatch). Each run is a fresh
process; runs alternate between the two. Only the training call is timed (model loading is not).

TRL is an optional dependency of this script only: pip install trl
    python benchmarks/vs_trl.py            # last line: ours/trl step time ratio: X.XX
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_ours(folder: str, s: dict, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import r2m
    from launch import tiny

    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "policy"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"))
    ref_policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"))
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "reward_model"))
    texts = [r["prompt"] for r in tiny.synthetic_tldr_rows(s["prompts"], seed=0)]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n, K = s["queries_per_step"], s["group_size"]
    cfg = r2m.R2MConfig(algo="grpo", reward="vanilla", queries_per_step=n, group_size=K,
                        total_trajectories=s["steps"] * n * K, max_new_tokens=s["max_new_tokens"],
                        temperature=s["temperature"], policy_lr=s["lr"], policy_epochs=s["epochs"],
                        policy_minibatch_size=s["minibatch"], micro_batch_size=s["minibatch"],
                        forward_batch_size=n * K, generation_batch_size=n * K, beta=s["beta"], clip_eps=0.2,
                        device="cpu", save_every=0, sample_every=0, output_dir=os.path.join(folder, "ours"),
                        overwrite=True)  # a scratch folder: each repeat replaces the last
    reward_model = r2m.R2MRewardModel(rm, d_policy=policy.config.hidden_size, d_attn=8)
    t = time.perf_counter()
    r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    queue.put(time.perf_counter() - t)


def run_trl(folder: str, s: dict, queue) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from launch import tiny

    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "policy"))
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "reward_model"))
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in tiny.synthetic_tldr_rows(s["prompts"], seed=0)])
    n, K = s["queries_per_step"], s["group_size"]
    updates_per_step = s["epochs"] * (n * K // s["minibatch"])
    args = GRPOConfig(
        output_dir=os.path.join(folder, "trl"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=10_000, max_steps=s["steps"] * updates_per_step, learning_rate=s["lr"],
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=s["minibatch"], gradient_accumulation_steps=1,
        generation_batch_size=n * K, num_generations=K, num_iterations=s["epochs"],
        max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_k=0, top_p=1.0,
        beta=s["beta"], epsilon=0.2, loss_type="grpo", scale_rewards="group", disable_dropout=True,
        seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=os.path.join(folder, "policy"), reward_funcs=rm, args=args, train_dataset=data,
                          processing_class=tokenizer, reward_processing_classes=tokenizer)
    t = time.perf_counter()
    trainer.train()
    queue.put(time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="RL steps per run (generation batch + k epochs each).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each implementation, alternating.")
    parser.add_argument("--queries_per_step", type=int, default=16, help="n: prompts per RL step.")
    parser.add_argument("--group_size", type=int, default=4, help="K: completions per prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Completion length cap.")
    parser.add_argument("--minibatch", type=int, default=32, help="Completions per optimiser step.")
    parser.add_argument("--epochs", type=int, default=2, help="k: passes over each generation batch.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per run.")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("error: this benchmark needs TRL (pip install trl); it is not a dependency of r2m itself")
    s = dict(vars(args), prompts=64, temperature=0.7, lr=1e-5, beta=0.05)
    if (s["queries_per_step"] * s["group_size"]) % s["minibatch"]:
        raise SystemExit("error: --minibatch must divide queries_per_step x group_size")

    from launch import tiny

    ctx = mp.get_context("spawn")
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as folder:
        tiny.save_models(folder)
        for rep in range(args.repeats):
            for name, fn in [("ours", run_ours), ("trl", run_trl)]:
                queue = ctx.Queue()
                proc = ctx.Process(target=fn, args=(folder, s, queue))
                proc.start()
                proc.join()
                if proc.exitcode != 0 or queue.empty():
                    raise SystemExit(f"error: the {name} run failed (exit code {proc.exitcode}); see its traceback above")
                times[name].append(queue.get() / args.steps)
                print(f"[{rep + 1}/{args.repeats}] {name:4s} {times[name][-1]:.3f} s per RL step", flush=True)
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["trl"])
    print(f"\n{args.steps} RL steps of {args.queries_per_step} x {args.group_size} completions (<= {args.max_new_tokens} "
          f"tokens), {args.epochs} epochs, minibatch {args.minibatch}, CPU threads {args.threads}; median of "
          f"{args.repeats} alternating runs each")
    print(f"{'':6s}{'s / RL step':>14s}\nours  {ours:14.3f}\ntrl   {theirs:14.3f}")
    print(f"ours/trl step time ratio: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
