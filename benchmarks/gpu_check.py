"""One short check that the one-GPU run is right on CUDA, sized for the time a GPU is lent: at most 8 minutes on one
H100 / H200, model builds included. It needs torch and transformers only (no `datasets`, no downloads).

    python benchmarks/gpu_check.py                         # one GPU; writes runs/gpu_check/gpu_check.{json,md}
    python benchmarks/gpu_check.py --size tiny --device cpu  # the same checks at a tiny size (its test runs this)

1. Smoke runs of both training scripts' real entry points (train_tldr.py, train_ultrafeedback.py) on small random
   models that the check saves as Hugging Face folders first: `from_pretrained`, `--bf16 true` (the frozen models
   loaded in bf16; the default on a GPU), 3 steps with a checkpoint after each; the first run is killed between the two renames of step 1's save (the
   crash-injection variable the crash tests use) and `--resume true` must finish it from that checkpoint.
2. One full-size TL;DR step (Pythia-2.8B's architecture, random weights) with the default batch sizes but 64 prompts
   x 4, so every phase runs at its full micro-batch size: vanilla and R2M, each in a fresh process, a warm-up step
   and a measured one. Per phase: seconds, torch.cuda.max_memory_allocated / max_memory_reserved, beside the
   memory plan's prediction for the same flags (benchmarks/memory_plan.py, run at the same time on the CPU);
   tokens/s and the policy update's MFU; the full default step (2048 x 4) and the full run (T = 122 steps)
   extrapolated from per-trajectory rates; R2M / vanilla ratios of time and memory.
The last lines printed are the markdown table that gpu_check.md holds.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GiB = 2**30
PHASES = ["generation", "old/ref log-probs", "RM annotation", "policy update", "RM update (GREBT)"]
# the memory plan's phases, as measured here (the plan splits the policy update into forward/backward and AdamW)
PLAN_PHASES = {"generation": ["generation"], "old/ref log-probs": ["old/ref log-probs"], "RM annotation": ["RM annotation"],
               "policy update": ["policy forward/backward", "policy AdamW step"], "RM update (GREBT)": ["RM update (GREBT)"]}
TINY_CONFIG = dict(model_type="gpt_neox", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                   hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
SIZES = {
    # the TL;DR defaults (SPEC §5) but 64 prompts x 4: 4 generation batches of 64, 8 forward batches of 32, 32
    # micro-batches of 8 per epoch, 2 GREBT minibatches of 32 groups
    "full": dict(config="pythia-2.8b.json", queries_per_step=64, group_size=4, max_new_tokens=50, prompt_tokens=512,
                 generation_batch_size=64, forward_batch_size=32, micro_batch_size=8, policy_minibatch_size=256,
                 rm_minibatch_groups=32, d_attn=2048),
    "tiny": dict(config=None, queries_per_step=8, group_size=4, max_new_tokens=8, prompt_tokens=32,
                 generation_batch_size=16, forward_batch_size=8, micro_batch_size=4, policy_minibatch_size=16,
                 rm_minibatch_groups=4, d_attn=32),
}
DEFAULT_RUN = dict(queries_per_step=2048, group_size=4, total_steps=122)  # what the extrapolation scales to
NOMINAL_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), for a second MFU figure


def log(t0: float, message: str) -> None:
    print(f"[{time.perf_counter() - t0:5.0f}s] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 1. The training scripts, end to end, on small random models saved as Hugging Face folders
# ----------------------------------------------------------------------------------------------------


def save_small_models(folder: str, script: str) -> tuple[str, str]:
    """A policy and a reward model as Hugging Face folders (with their tokenizers): GPT-NeoX for TL;DR; for dialogue a
    Llama-style policy and a Llama-style RM of another width, tokenizer and chat format (as LLaMA3 vs Skywork)."""
    from launch import tiny

    tokenizer = tiny.build_tokenizer()
    if script == "train_tldr.py":
        rm_tokenizer = tokenizer
        policy = tiny.build_policy(tokenizer, hidden_size=128)
        rm = tiny.build_reward_model(tokenizer, hidden_size=96)
    else:
        rm_tokenizer = tiny.build_tokenizer(vocab_size=400, chat_template=tiny.RM_CHAT_TEMPLATE)
        policy = tiny.build_policy(tokenizer, hidden_size=128, arch="llama")
        rm = tiny.build_reward_model(rm_tokenizer, hidden_size=96, arch="llama")
    paths = os.path.join(folder, "policy"), os.path.join(folder, "reward_model")
    for model, tok, path in ((policy, tokenizer, paths[0]), (rm, rm_tokenizer, paths[1])):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def smoke(script: str, folder: str, device: str, timeout: float) -> dict:
    """3 steps of a script's real entry point, killed mid-save at step 1 and resumed. -> what happened."""
    from launch import tiny

    policy, rm = save_small_models(os.path.join(folder, "models"), script)
    out = os.path.join(folder, "run")
    dataset = ["--dataset", tiny.TLDR_TINY] if script == "train_tldr.py" else \
        ["--dataset", tiny.ULTRAFEEDBACK_TINY, "--dataset_split", "train", "--max_chosen_tokens", "64"]
    flags = ["--policy_model", policy, "--reward_model", rm, *dataset, "--device", device, "--queries_per_step", "8",
             "--group_size", "4", "--total_trajectories", "96", "--max_new_tokens", "8", "--policy_minibatch_size", "16",
             "--micro_batch_size", "8", "--forward_batch_size", "32", "--generation_batch_size", "32",
             "--rm_minibatch_groups", "4", "--d_attn", "32", "--max_prompt_tokens", "128", "--save_every", "1",
             "--sample_every", "0", "--output_dir", out, "--bf16", "true"]  # on a CPU too: the GPU's dtype path
    command = [sys.executable, os.path.join(ROOT, script), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    killed = subprocess.run(command, env={**env, "R2M_TEST_KILL_BETWEEN_RENAMES": "1"}, capture_output=True, text=True,
                            timeout=timeout)
    resumed = subprocess.run([*command, "--resume", "true"], env=env, capture_output=True, text=True, timeout=timeout)
    result = {"seconds": round(time.perf_counter() - t, 1), "killed_exit": killed.returncode,
              "resumed_exit": resumed.returncode}
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            result["steps"] = [json.loads(line)["step"] for line in f]
    except (OSError, ValueError):
        result["steps"] = []
    log_text = resumed.stdout + resumed.stderr
    result["ok"] = (killed.returncode == -9 and resumed.returncode == 0 and result["steps"] == [0, 1, 2]
                    and "at step 2/3" in log_text)
    if not result["ok"]:
        result["error"] = (killed.stderr + resumed.stderr).strip().splitlines()[-3:]
    return result


# ----------------------------------------------------------------------------------------------------
# 2. One full-size step, each variant in a fresh process; the memory plan beside it
# ----------------------------------------------------------------------------------------------------


def config_paths(size: dict, folder: str) -> tuple[str, str]:
    """The policy's and the RM's config.json (the same architecture for both, as on TL;DR)."""
    if size["config"]:
        path = os.path.join(ROOT, "benchmarks", "configs", size["config"])
    else:
        path = os.path.join(folder, "tiny_config.json")
        with open(path, "w") as f:
            json.dump(TINY_CONFIG, f)
    return path, path


def step_config(variant: str, size: dict, device: str, output_dir: str):
    import r2m

    keys = set(r2m.R2MConfig.__dataclass_fields__)
    return r2m.R2MConfig(**{k: v for k, v in size.items() if k in keys}, reward=variant, device=device,
                         total_trajectories=2 * size["queries_per_step"] * size["group_size"], save_every=0,
                         sample_every=0, overwrite=True, output_dir=output_dir, seed=0)


def measure(variant: str, size: dict, device: str, config: str, output_dir: str, results) -> None:
    """A fresh process: build the models (random weights, on the device), run a warm-up and a measured step of
    `r2m.train`, and report the measured step's phases. The phases are timed and their peak memory read around
    r2m's own functions (patched here only)."""
    import copy
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    import r2m
    from launch import runner

    torch.manual_seed(0)
    with open(config) as f:
        spec = json.load(f)
    model_config = AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    model_config.num_labels = 1
    t_build = time.perf_counter()
    with torch.device(device):  # random weights made on the GPU: 2.8B of them on a CPU take minutes
        policy = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        rm = AutoModelForSequenceClassification.from_config(model_config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    ref_policy = copy.deepcopy(policy)
    build_seconds = time.perf_counter() - t_build
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases: dict[tuple[int, str], dict] = {}
    step = [-1]

    def start():
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def stop(name: str, t: float) -> None:
        sync()
        entry = phases.setdefault((step[0], name), {"seconds": 0.0, "allocated": 0, "reserved": 0})
        entry["seconds"] += time.perf_counter() - t
        if cuda:
            entry["allocated"] = max(entry["allocated"], torch.cuda.max_memory_allocated())
            entry["reserved"] = max(entry["reserved"], torch.cuda.max_memory_reserved())

    def timed(name: str, fn):
        def wrapped(*args, **kwargs):
            t = start()
            out = fn(*args, **kwargs)
            stop(name, t)
            return out
        return wrapped

    generate, rollout = policy.generate, r2m.rollout

    def timed_generate(*args, **kwargs):  # inside the rollout, before its log-prob forwards
        t = start()
        out = generate(*args, **kwargs)
        stop("generation", t)
        start()  # the peak counter restarts: what follows in the rollout is its own forwards
        return out

    def timed_rollout(*args, **kwargs):
        step[0] += 1
        t = start()
        out = rollout(*args, **kwargs)
        stop("old/ref log-probs", t)  # its peak: since the last generate() ended; its time: the rest of the rollout
        phases[(step[0], "old/ref log-probs")]["seconds"] -= phases[(step[0], "generation")]["seconds"]
        return out

    policy.generate = timed_generate
    r2m.rollout = timed_rollout
    r2m.annotate_rewards = timed("RM annotation", r2m.annotate_rewards)
    r2m.policy_update = timed("policy update", r2m.policy_update)
    r2m.reward_model_update = timed("RM update (GREBT)", r2m.reward_model_update)

    cfg = step_config(variant, size, device, output_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, model_config.vocab_size) for _ in range(size["prompt_tokens"])]
               for _ in range(4 * size["queries_per_step"])]
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0, decode=lambda *a, **k: "")
    params = sum(p.numel() for p in policy.parameters()) - policy.get_input_embeddings().weight.numel()
    reward_model = runner.build_reward(cfg, rm, policy)
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    measured = history[-1]
    results.put({
        "variant": variant, "build_seconds": build_seconds, "step_seconds": measured["time/step"],
        "response_length": measured["response/length"], "policy_params": params,
        "gradient_checkpointing": cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing,
        "phases": {name: v for (s, name), v in phases.items() if s == 1},
    })


def start_plan(variant: str, size: dict, config: str, folder: str) -> tuple[subprocess.Popen, str]:
    """The memory plan's prediction for the same flags (as on a GPU), computed on the CPU by its own command while
    the device measures -> (the running process, the JSON file it writes)."""
    out = os.path.join(folder, f"plan_{variant}.json")
    flags = {k: size[k] for k in ("queries_per_step", "group_size", "max_new_tokens", "generation_batch_size",
                                  "forward_batch_size", "micro_batch_size", "policy_minibatch_size", "rm_minibatch_groups",
                                  "d_attn")}
    flags.update(max_prompt_tokens=size["prompt_tokens"], reward=variant, policy_config=config, reward_config=config,
                 total_trajectories=2 * size["queries_per_step"] * size["group_size"],
                 output_dir=os.path.join(folder, f"plan_{variant}"), json_out=out)
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "memory_plan.py"),
               *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def finish_plan(process: subprocess.Popen, out: str, timeout: float) -> dict:
    """What the plan predicts per phase of this check (step 2 of the plan: the steady state, as the measured step)."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"error": f"the memory plan took over {timeout:.0f} s"}
    if process.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["the memory plan failed"])[-1]}
    with open(out) as f:
        plan = json.load(f)
    peaks = {name: max(plan["peaks"]["2"][p] for p in phases) for name, phases in PLAN_PHASES.items()}
    return {"peaks": peaks, "host": plan["host"], "verdict": plan["verdict"]}


def in_process(target, args: tuple, timeout: float) -> dict:
    """Run target(*args, queue) in a fresh (spawned) process -> what it put, or {"error": ...}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    try:
        out = results.get(timeout=timeout)
    except queue_module.Empty:
        out = {"error": f"no result within {timeout:.0f} s (exit code {proc.exitcode})"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return out


def matmul_flops(device: str) -> float:
    """This device's measured dense matmul rate (bf16 on a GPU, float32 on a CPU), FLOP/s."""
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def summarise(measured: dict, plans: dict, size: dict, flops: float, device_name: str) -> dict:
    """Per-trajectory rates -> tokens/s, MFU, the full default step and run; R2M / vanilla ratios."""
    N = size["queries_per_step"] * size["group_size"]
    full_N = DEFAULT_RUN["queries_per_step"] * DEFAULT_RUN["group_size"]
    out = {}
    for variant, m in measured.items():
        if "error" in m:
            out[variant] = {"error": m["error"]}
            continue
        tokens = N * (size["prompt_tokens"] + m["response_length"])
        policy = m["phases"].get("policy update", {}).get("seconds") or math.nan
        multiplier = 8 if m["gradient_checkpointing"] else 6  # forward + backward, + a recomputed forward
        useful = 2 * 6 * m["policy_params"] * tokens  # 2 epochs x 6·params FLOPs per token
        nominal = next((v for k, v in NOMINAL_BF16_FLOPS.items() if k in device_name), None)
        full_step = m["step_seconds"] * full_N / N
        out[variant] = {
            "step_seconds": m["step_seconds"], "tokens_per_second": tokens / m["step_seconds"],
            "mfu_vs_measured_matmul": useful / policy / flops,
            "hardware_flops_utilisation": useful * multiplier / 6 / policy / flops,
            "mfu_vs_nominal_peak": useful / policy / nominal if nominal else None,
            "full_step_seconds": full_step, "full_run_hours": full_step * DEFAULT_RUN["total_steps"] / 3600,
            "peak_allocated_gib": max((p["allocated"] for p in m["phases"].values()), default=0) / GiB,
            "peak_reserved_gib": max((p["reserved"] for p in m["phases"].values()), default=0) / GiB,
        }
    if all("error" not in out.get(v, {"error": 1}) for v in ("vanilla", "r2m")):
        v, r = out["vanilla"], out["r2m"]
        out["r2m_over_vanilla"] = {
            "step_time": r["step_seconds"] / v["step_seconds"],
            "peak_allocated": r["peak_allocated_gib"] / v["peak_allocated_gib"] if v["peak_allocated_gib"] else None,
            "peak_reserved": r["peak_reserved_gib"] / v["peak_reserved_gib"] if v["peak_reserved_gib"] else None,
        }
    return out


def table(report: dict) -> str:
    """The markdown the check prints last and writes to gpu_check.md."""
    gib = lambda b: (f"{b / GiB:.1f}" if b >= 10 * GiB else f"{b / GiB:.2f}") if b else "–"  # noqa: E731
    lines = [f"**{report['device']}**, torch {report['torch']}, transformers {report['transformers']}; "
             f"{report['seconds']:.0f} s in all", ""]
    for script, s in report["smoke"].items():
        lines.append(f"- smoke `{script}` on {report['device_type']} (from_pretrained, --bf16 true, killed in step 1's "
                     f"save, resumed): {'ok' if s.get('ok') else 'FAILED ' + str(s.get('error', ''))}, steps {s.get('steps')}, "
                     f"{s.get('seconds', 0):.0f} s")
    size = report["size"]
    lines += ["", f"One step of {size['queries_per_step']} prompts x {size['group_size']} (prompts {size['prompt_tokens']} + "
              f"{size['max_new_tokens']} new tokens; generation {size['generation_batch_size']}, forward "
              f"{size['forward_batch_size']}, micro {size['micro_batch_size']}), the second of a fresh process:", "",
              "| phase | vanilla s | vanilla GiB allocated / reserved | plan GiB | R2M s | R2M GiB allocated / reserved | plan GiB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    measured, plans = report["measured"], report["plan"]
    for phase in PHASES:
        cells = []
        for variant in ("vanilla", "r2m"):
            p = measured.get(variant, {}).get("phases", {}).get(phase)
            predicted = plans.get(variant, {}).get("peaks", {}).get(phase)
            cells += [f"{p['seconds']:.2f}" if p else "–", f"{gib(p['allocated'])} / {gib(p['reserved'])}" if p else "–",
                      gib(predicted)]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    summary = report["summary"]
    for variant in ("vanilla", "r2m"):
        s = summary.get(variant, {})
        if "error" in s:
            lines.append(f"- {variant}: FAILED: {s['error']}")
            continue
        if not s:
            continue
        nominal = f", {s['mfu_vs_nominal_peak']:.1%} of the nominal bf16 peak" if s.get("mfu_vs_nominal_peak") else ""
        lines.append(f"- {variant}: step {s['step_seconds']:.1f} s, {s['tokens_per_second']:.0f} tokens/s; policy-update MFU "
                     f"{s['mfu_vs_measured_matmul']:.1%} of the measured matmul rate{nominal}; extrapolated: the default "
                     f"step (2048 x 4) {s['full_step_seconds'] / 60:.1f} min, the run (T = 122) {s['full_run_hours']:.1f} h")
    if "r2m_over_vanilla" in summary:
        ratio = summary["r2m_over_vanilla"]
        memory = f", peak memory allocated {ratio['peak_allocated']:.2f}x, reserved {ratio['peak_reserved']:.2f}x" \
            if ratio["peak_allocated"] else ""
        lines.append(f"- R2M / vanilla: step time {ratio['step_time']:.2f}x{memory}")
    host = plans.get("r2m", {}).get("host")
    if host:
        lines.append(f"- host memory (plan, this step size): models {host['models'] / GiB:.1f} GiB before they move to the "
                     f"device, hidden states {host['hidden'] / GiB:.2f} GiB pinned")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="'full' (Pythia-2.8B's size, for a GPU) or 'tiny' (the same checks in a minute on a CPU).")
    parser.add_argument("--device", default="cuda", help="'cuda' or 'cpu'.")
    parser.add_argument("--output_dir", default="runs/gpu_check", help="Where gpu_check.json and gpu_check.md go.")
    parser.add_argument("--budget_seconds", type=float, default=480, help="Stop starting new parts after this long.")
    args = parser.parse_args(argv)
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is visible; on a CPU use --size tiny --device cpu")
    t0 = time.perf_counter()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    size = dict(SIZES[args.size])
    report = {"device": device_name, "device_type": args.device, "torch": torch.__version__,
              "transformers": transformers.__version__, "size": size, "smoke": {}, "measured": {}, "plan": {}}
    left = lambda: args.budget_seconds - (time.perf_counter() - t0)  # noqa: E731
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config, _ = config_paths(size, tmp)
        # the memory plan needs only the CPU: it runs while the device measures
        planners = {v: start_plan(v, size, config, tmp) for v in ("vanilla", "r2m")}
        for script in ("train_tldr.py", "train_ultrafeedback.py"):
            folder = os.path.join(tmp, script.split(".")[0])
            try:
                report["smoke"][script] = smoke(script, folder, args.device, timeout=max(30.0, min(180.0, left())))
            except subprocess.TimeoutExpired as e:
                report["smoke"][script] = {"ok": False, "error": f"timed out after {e.timeout:.0f} s"}
            log(t0, f"smoke {script}: {'ok' if report['smoke'][script]['ok'] else 'FAILED'}")
        for variant in ("vanilla", "r2m"):
            if left() < 30:
                report["measured"][variant] = {"error": "out of time"}
                continue
            report["measured"][variant] = in_process(measure, (variant, size, args.device, config,
                                                               os.path.join(tmp, f"step_{variant}")), timeout=left())
            m = report["measured"][variant]
            log(t0, f"{variant} step: " + (f"{m['step_seconds']:.1f} s" if "error" not in m else m["error"]))
        for variant, (process, out) in planners.items():
            report["plan"][variant] = finish_plan(process, out, timeout=max(5.0, left() + 60))
    flops = matmul_flops(args.device)
    report["measured_matmul_tflops"] = flops / 1e12
    report["summary"] = summarise(report["measured"], report["plan"], size, flops, device_name)
    report["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    markdown = table(report)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown + "\n")
    print("\n" + markdown)
    return report


if __name__ == "__main__":
    main()
