"""What one R2M training step costs, against vanilla RLOO and against updating the whole RM.

Runs full steps of the real loop (`r2m.train`: generation, old/ref log-probs with hidden-state capture, reward
annotation, k policy epochs, the RM step) for each variant, alternating variants after a warm-up step, each
measurement in a fresh process (so peak memory is that variant's own), with the same seed and prompts.
Reports per phase and in total: wall time, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS)
and tokens/s; the ideal step time from the device's measured matmul rate and memory bandwidth; the
policy-update MFU. The last line is `r2m/vanilla step time ratio: X.XX, peak memory ratio: Y.YY`.

    python benchmarks/step_bench.py --preset tiny                    # CPU, ~2 minutes
    python benchmarks/step_bench.py --model pythia-2.8b-random       # one GPU: TL;DR defaults, random weights
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ["rollout", "reward", "policy", "reward_model"]
VARIANTS = {"vanilla": "vanilla", "r2m": "r2m", "whole RM": "r2m_full_rm"}

# Pythia-2.8B's architecture (EleutherAI/pythia-2.8b-deduped config.json), built with random weights.
PYTHIA_2_8B = dict(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   intermediate_size=10240, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                   hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)

PRESETS = {
    "tiny": dict(queries_per_step=16, group_size=4, max_new_tokens=16, prompt_tokens=64, generation_batch_size=64,
                 forward_batch_size=32, micro_batch_size=16, policy_minibatch_size=32, rm_minibatch_groups=8,
                 d_attn=32, device="cpu", repeats=3, measured_steps=3),
    # the paper's TL;DR defaults (§5): 2048 prompts x 4, <= 50 new tokens, prompts <= 512 tokens (worst case: all 512).
    "pythia-2.8b-random": dict(queries_per_step=2048, group_size=4, max_new_tokens=50, prompt_tokens=512,
                               generation_batch_size=64, forward_batch_size=64, micro_batch_size=16,
                               policy_minibatch_size=512, rm_minibatch_groups=32, d_attn=2048, device="cuda",
                               repeats=1, measured_steps=1),
}


def build(model: str, seed: int, device: str = "cuda", layers: int | None = None):
    """policy, ref_policy, rm, tokenizer stand-in, prompts (token ids), parameter counts."""
    import copy
    import random
    from types import SimpleNamespace

    import torch

    from launch import tiny

    if model == "tiny":
        tokenizer = tiny.build_tokenizer()
        policy = tiny.build_policy(tokenizer, seed=seed)
        rm = tiny.build_reward_model(tokenizer, seed=seed + 1)
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

        arch = {**PYTHIA_2_8B, **({"num_hidden_layers": layers} if layers else {})}
        config = GPTNeoXConfig(**arch, pad_token_id=0, eos_token_id=0, bos_token_id=0, num_labels=1)
        torch.manual_seed(seed)
        with torch.device(device):  # build on the GPU directly: 2.8B random weights on CPU take minutes
            policy = GPTNeoXForCausalLM(config)
            rm = GPTNeoXForSequenceClassification(config).to(torch.bfloat16)
        vocab, eos = config.vocab_size, 0
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=eos, decode=lambda *a, **k: "")
    ref_policy = copy.deepcopy(policy)
    rng = random.Random(seed)
    return policy, ref_policy, rm, tokenizer, vocab, eos, rng


def count_params(model) -> int:
    """Parameters that do arithmetic per token (the input embedding is a lookup, not a matmul)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def measure(model: str, variant: str, settings: dict, seed: int, queue) -> None:
    """One fresh process: a warm-up step, then `measured_steps` steps of one variant; reports the median
    time of each phase over the measured steps, and the process's peak memory."""
    import torch

    import r2m
    from launch import runner

    if settings["device"] == "cpu":
        torch.set_num_threads(settings.get("threads") or os.cpu_count())
    policy, ref_policy, rm, tokenizer, vocab, eos, rng = build(model, seed, settings["device"], settings.get("layers"))
    prompts = [[rng.randrange(1, vocab) for _ in range(settings["prompt_tokens"])] for _ in range(settings["queries_per_step"])]
    n_traj = settings["queries_per_step"] * settings["group_size"]
    keys = set(r2m.R2MConfig.__dataclass_fields__)
    cfg = r2m.R2MConfig(**{k: v for k, v in settings.items() if k in keys and k != "output_dir"}, reward=variant,
                        total_trajectories=(1 + settings["measured_steps"]) * n_traj, save_every=0, sample_every=0, seed=seed,
                        overwrite=True,  # a scratch folder: each benchmark run replaces the last
                        output_dir=os.path.join(settings["output_dir"], variant))
    params_p, params_r = count_params(policy), count_params(rm)
    reward_model = runner.build_reward(cfg, rm, policy)
    if torch.cuda.is_available() and settings["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    measured_steps = history[1:]  # after the warm-up step; ω < 1 from step 1 on, so the cross-attention runs
    measured = {k: statistics.median(h[k] for h in measured_steps) for k in measured_steps[0]}
    if settings["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"variant": variant, **{p: measured[f"time/{p}"] for p in PHASES}, "step": measured["time/step"],
               "peak_bytes": peak, "params_policy": params_p, "params_rm": params_r,
               "response_tokens": measured["response/length"] * n_traj})


def device_ceilings(device: str) -> tuple[float, float, str]:
    """Measured matmul FLOP/s and copy bandwidth (bytes read + written per second) of this device."""
    import torch

    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
        sync, n, dtype = torch.cuda.synchronize, 8192, "bf16"
    else:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        x = torch.randn(2**27)  # 512 MB of float32
        sync, n, dtype = (lambda: None), 2048, "fp32"
    for _ in range(3):
        a @ b
        x.clone()
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    flops = 10 * 2 * n**3 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(5):
        x.clone()
    sync()
    bandwidth = 5 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t)
    return flops, bandwidth, dtype


def ideal_step_seconds(s: dict, params_p: int, params_r: int, flops: float, bandwidth: float, weight_bytes: int) -> dict:
    """Lower bound per phase: max(FLOPs / matmul rate, bytes / bandwidth), with 2·params FLOPs per token
    forward and 6·params forward + backward (8· with gradient checkpointing's recomputation on GPU)."""
    N = s["queries_per_step"] * s["group_size"]
    P, R = s["prompt_tokens"], s["max_new_tokens"]
    tokens = N * (P + R)
    decode_batches = math.ceil(N / s["generation_batch_size"])
    # generation: prefill is compute; each decode step reads the policy's weights once per batch
    gen = max(2 * params_p * N * (P + R) / flops, R * decode_batches * params_p * weight_bytes / bandwidth)
    train_mult = 8 if s["device"] == "cuda" else 6
    return {
        "rollout": gen + 2 * (2 * params_p * tokens) / flops,  # + old and ref log-prob forwards
        "reward": 2 * params_r * tokens / flops,
        "policy": s.get("policy_epochs", 2) * train_mult * params_p * tokens / flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny"], default=None, help="Tiny CPU benchmark (same as --model tiny).")
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="Model set: 'tiny' or 'pythia-2.8b-random'.")
    parser.add_argument("--repeats", type=int, default=None, help="Measurement processes per variant (alternating).")
    parser.add_argument("--measured_steps", type=int, default=None, help="Steps measured per process, after one warm-up step.")
    parser.add_argument("--variants", default="vanilla,r2m,whole RM", help="Comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per measurement (default: all).")
    parser.add_argument("--device", default=None, help="Override the preset's device ('cuda' or 'cpu').")
    parser.add_argument("--layers", type=int, default=None, help="Override the Pythia depth (a CPU smoke test of the GPU path).")
    parser.add_argument("--output_dir", default="runs/bench", help="Scratch folder for the runs' metrics.")
    for name in ["queries_per_step", "group_size", "max_new_tokens", "prompt_tokens", "generation_batch_size",
                 "forward_batch_size", "micro_batch_size", "policy_minibatch_size"]:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"Override the preset's {name}.")
    args = parser.parse_args()
    model = args.preset or args.model
    settings = dict(PRESETS[model])
    for k, v in vars(args).items():
        if v is not None and (k in settings or k in ("threads", "output_dir", "layers")):
            settings[k] = v
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "vanilla" not in variants or "r2m" not in variants:
        raise SystemExit(f"error: --variants must include vanilla and r2m, from {list(VARIANTS)}; got {variants}")

    ctx = mp.get_context("spawn")  # fresh interpreter per measurement: clean peak memory, no CUDA-after-fork
    results: dict[str, list[dict]] = {v: [] for v in variants}
    failed: dict[str, str] = {}
    for rep in range(settings["repeats"]):
        for v in [v for v in variants if v not in failed]:  # alternate variants so machine noise hits all alike
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(model, VARIANTS[v], settings, 0, queue))
            proc.start()
            proc.join()  # the child puts one small dict: it cannot block on a full pipe
            if proc.exitcode != 0 or queue.empty():  # e.g. out of memory: the other variants still get measured
                failed[v] = f"failed (exit code {proc.exitcode}; its traceback is above)"
                print(f"[{rep + 1}/{settings['repeats']}] {v:9s} {failed[v]}", flush=True)
                continue
            result = queue.get()
            results[v].append(result)
            print(f"[{rep + 1}/{settings['repeats']}] {v:9s} step {result['step']:.3f}s, "
                  f"peak {result['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    if "vanilla" in failed or "r2m" in failed:
        raise SystemExit("error: " + "; ".join(f"the {v} measurement {why}" for v, why in failed.items()))
    variants = [v for v in variants if v not in failed]
    med = {v: {k: statistics.median(r[k] for r in rs) for k in PHASES + ["step", "peak_bytes"]}
           for v, rs in results.items() if v not in failed}
    first = results["vanilla"][0]
    N = settings["queries_per_step"] * settings["group_size"]
    tokens = N * (settings["prompt_tokens"] + settings["max_new_tokens"])
    print(f"\nmodel {model} on {settings['device']}: {N} trajectories/step, prompts {settings['prompt_tokens']} tokens, "
          f"<= {settings['max_new_tokens']} new; policy {first['params_policy'] / 1e6:.1f}M, RM {first['params_rm'] / 1e6:.1f}M "
          f"non-embedding params; median over {settings['repeats']} alternating process(es) x {settings['measured_steps']} step(s)")
    header = f"{'phase':14s}" + "".join(f"{v:>14s}" for v in variants)
    print(header)
    for p in PHASES + ["step"]:
        print(f"{p + ' (s)':14s}" + "".join(f"{med[v][p]:14.3f}" for v in variants))
    print(f"{'peak (GiB)':14s}" + "".join(f"{med[v]['peak_bytes'] / 2**30:14.3f}" for v in variants))
    print(f"{'tokens/s':14s}" + "".join(f"{tokens / med[v]['step']:14.0f}" for v in variants))
    for v in variants[1:]:
        print(f"{v}/vanilla: step time {med[v]['step'] / med['vanilla']['step']:.2f}x, "
              f"peak memory {med[v]['peak_bytes'] / med['vanilla']['peak_bytes']:.2f}x")

    flops, bandwidth, dtype = device_ceilings(settings["device"])
    weight_bytes = 2 if settings["device"] == "cuda" else 4
    ideal = ideal_step_seconds(settings, first["params_policy"], first["params_rm"], flops, bandwidth, weight_bytes)
    total_ideal = sum(ideal.values())
    print(f"\ndevice ceilings (measured): {dtype} matmul {flops / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
    print("ideal (s):    " + ", ".join(f"{k} {t:.3f}" for k, t in ideal.items()) + f"; step {total_ideal:.3f}")
    print(f"fraction of ideal reached by the vanilla step: {total_ideal / med['vanilla']['step']:.1%}; "
          f"by the R2M step: {total_ideal / med['r2m']['step']:.1%}")
    mfu = settings.get("policy_epochs", 2) * 6 * first["params_policy"] * tokens / med["r2m"]["policy"] / flops
    print(f"policy-update MFU (6·params·tokens / time / measured peak {dtype} matmul rate): {mfu:.1%}")
    for v, why in failed.items():
        print(f"{v}: {why}")
    print(f"r2m/vanilla step time ratio: {med['r2m']['step'] / med['vanilla']['step']:.2f}, "
          f"peak memory ratio: {med['r2m']['peak_bytes'] / med['vanilla']['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
