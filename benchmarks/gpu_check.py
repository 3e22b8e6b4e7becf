"""One short check that the one-GPU run is right on CUDA, sized for a short GPU rental: at most 6 minutes on one
H100 / H200, process starts and model builds included. It needs torch and transformers only (no `datasets`, no
downloads). docs/scale.md gives the command for a rented GPU and says what to read in its table.

    python benchmarks/gpu_check.py --output_dir runs/gpu_check    # one GPU
    python benchmarks/gpu_check.py --rehearse                      # the same code path on a CPU, tiny sizes (< 3 min)

Its parts, in order; each appends its line to `results.jsonl` in --output_dir as it ends (flushed), so a check that
its time limit stops still says how far it got and what it measured:
0. configs: every config file in benchmarks/configs/ becomes a model through `launch.configs.model_config`, the
   function the full-size step and the memory plan build from (on the meta device: no memory, no time); in a
   rehearsal each is also cut to a tiny size, built and run forward.
1. smoke runs of both training scripts' real entry points (train_tldr.py, train_ultrafeedback.py) on small random
   models saved as Hugging Face folders first: `from_pretrained`, `--bf16 true`, 3 steps with a checkpoint after
   each; the first run is killed between the two renames of step 1's save and `--resume true` must finish it.
2. one full-size TL;DR step (Pythia-2.8B's architecture, random weights) with the default batch sizes but 64
   prompts x 4, so every phase runs at its full micro-batch size: vanilla and R2M, each in a fresh process, a
   warm-up step and a measured one. Per phase: seconds and torch.cuda.max_memory_allocated / max_memory_reserved,
   beside the memory plan's prediction for the same flags (benchmarks/memory_plan.py, run on the CPU meanwhile);
   tokens/s and the policy update's MFU; the full default step (2048 x 4) and run (T = 122) extrapolated from
   per-trajectory rates; R2M / vanilla ratios.
3. the device's dense matmul rate.

Every child process and subprocess gets at most the time the budget has left (--budget_seconds). One that fails is
reported at once (the last lines of its exception, or its exit code and signal) and the check goes on to its next
part; it exits non-zero at the end if any part failed or did not run. The last lines printed are the markdown table
that gpu_check.md holds.
"""

from __future__ import annotations

import os

# Generation grows and frees its KV cache every step, at a new prompt length each time: expandable segments keep
# the CUDA caching allocator from fragmenting (set before torch starts CUDA; a user's own setting wins).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import queue as queue_module  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import configs  # noqa: E402  (the standard library only: no torch before the setting above)

GiB = 2**30
PHASES = ["generation", "old/ref log-probs", "RM annotation", "policy update", "RM update (GREBT)"]
# the memory plan's phases, as measured here (the plan splits the policy update into forward/backward and AdamW)
PLAN_PHASES = {"generation": ["generation"], "old/ref log-probs": ["old/ref log-probs"], "RM annotation": ["RM annotation"],
               "policy update": ["policy forward/backward", "policy AdamW step"], "RM update (GREBT)": ["RM update (GREBT)"]}
STEP_CONFIG = "pythia-2.8b.json"  # the TL;DR policy and RM architecture
SIZES = {
    # the TL;DR defaults (generation, forward and micro batch sizes, checkpointed layers: r2m.R2MConfig's) but 64 prompts
    # x 4, of TL;DR's prompt lengths: every phase at its full batch size
    "full": dict(queries_per_step=64, group_size=4, max_new_tokens=50, prompt_lengths=configs.TLDR_PROMPT_LENGTHS,
                 policy_minibatch_size=256, rm_minibatch_groups=32, d_attn=2048),
    # the same config file cut to a tiny size (launch.configs.TINY), at step sizes a CPU runs in seconds
    "tiny": dict(queries_per_step=8, group_size=4, max_new_tokens=8, prompt_lengths=(12, 32), generation_batch_size=16,
                 forward_batch_size=8, micro_batch_size=4, policy_minibatch_size=16, rm_minibatch_groups=4, d_attn=32),
}
DEFAULT_RUN = dict(queries_per_step=2048, group_size=4, total_steps=122)  # what the extrapolation scales to
NOMINAL_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM), for a second MFU figure
RESULTS = "results.jsonl"


class Budget:
    """The check's time: every part, child process and subprocess gets at most what is left."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Results:
    """results.jsonl: one line per part, appended and flushed to disk as the part ends."""

    def __init__(self, folder: str, budget: Budget):
        os.makedirs(folder, exist_ok=True)
        self.path, self.budget, self.parts = os.path.join(folder, RESULTS), budget, {}
        open(self.path, "w").close()

    def add(self, part: str, result: dict) -> dict:
        result = {"part": part, "ok": "error" not in result, "at_seconds": round(self.budget.elapsed(), 1), **result}
        self.parts[part] = result
        with open(self.path, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[{result['at_seconds']:5.0f}s] {part}: " + ("ok" if result["ok"] else f"FAILED: {result['error']}"),
              flush=True)
        return result


def last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def exit_description(code: int | None) -> str:
    """A process's exit code in words: 'exit code 3', 'killed by SIGKILL'."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ----------------------------------------------------------------------------------------------------
# Child processes: a result, or the error, within seconds of the child's end
# ----------------------------------------------------------------------------------------------------


def _child(target, args: tuple, results, log: Optional[str]) -> None:
    if log:  # the child's own output (progress bars, step lines) goes to a file, not among the check's lines
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        results.put(target(*args))
    except BaseException:  # noqa: BLE001 - whatever stops the child is what the check reports
        results.put({"error": last_lines(traceback.format_exc())})


def run_child(target, args: tuple, timeout: float, log: Optional[str] = None) -> dict:
    """target(*args) in a fresh (spawned) process -> the dict it returns, or {"error": ...}: its exception's last
    lines, or, if it died without a word (os._exit, a signal, the OOM killer), its exit code or signal, seen within a
    second; or that it ran out of its `timeout` (then it is killed). log: a file for the child's output."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, args, results, log), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return results.get(timeout=0.5)
            except queue_module.Empty:
                pass
            if not proc.is_alive():
                try:  # it may have put its result just before it ended
                    return results.get(timeout=2)
                except queue_module.Empty:
                    return {"error": f"the process ended without a result ({exit_description(proc.exitcode)})"}
            if time.monotonic() >= deadline:
                return {"error": f"no result within its {timeout:.0f} s of the budget"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)


def run_command(command: list[str], budget: Budget, env: dict) -> subprocess.CompletedProcess:
    """A subprocess given what the budget has left; TimeoutExpired when that runs out (it is killed)."""
    left = budget.left()
    if left < 1:
        raise subprocess.TimeoutExpired(command, 0)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=left)


# ----------------------------------------------------------------------------------------------------
# 0. The config files become models
# ----------------------------------------------------------------------------------------------------


def check_configs(rehearse: bool) -> dict:
    """Every shipped config through `launch.configs.model_config`: built at full size on the meta device (shapes
    only); in a rehearsal also cut to a tiny size, built on the CPU and run forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, failed = {}, []
    for path in configs.shipped_configs():
        name = os.path.basename(path)
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in AutoModelForCausalLM.from_config(configs.model_config(path)).parameters())
            out[name] = f"{params / 1e9:.2f}B parameters"
            if rehearse:
                tiny = configs.model_config(path, tiny=True, num_labels=1)
                ids = torch.randint(1, tiny.vocab_size, (2, 8))
                with torch.no_grad():
                    AutoModelForCausalLM.from_config(tiny)(ids)
                    AutoModelForSequenceClassification.from_config(tiny)(ids)
                out[name] += ", tiny cut runs"
        except BaseException as e:  # noqa: BLE001 - SystemExit from a bad file too: reported, not fatal
            failed.append(name)
            out[name] = f"FAILED: {type(e).__name__}: {last_lines(str(e), 1)}"
    return {"configs": out, **({"error": f"{', '.join(failed)} did not build"} if failed else {})}


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


def smoke(script: str, folder: str, device: str, budget: Budget) -> dict:
    """3 steps of a script's real entry point, killed mid-save at step 1 and resumed -> what happened."""
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
    try:
        killed = run_command(command, budget, {**env, "R2M_TEST_KILL_BETWEEN_RENAMES": "1"})
        resumed = run_command([*command, "--resume", "true"], budget, env)
    except subprocess.TimeoutExpired:
        return {"error": "out of the budget's time", "seconds": round(time.perf_counter() - t, 1)}
    result = {"seconds": round(time.perf_counter() - t, 1), "killed_exit": killed.returncode,
              "resumed_exit": resumed.returncode}
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            result["steps"] = [json.loads(line)["step"] for line in f]
    except (OSError, ValueError):
        result["steps"] = []
    if not (killed.returncode == -9 and resumed.returncode == 0 and result["steps"] == [0, 1, 2]
            and "at step 2/3" in resumed.stdout + resumed.stderr):
        result["error"] = (f"killed run: {exit_description(killed.returncode)}, resumed run: "
                           f"{exit_description(resumed.returncode)}, steps {result['steps']}: "
                           + last_lines(killed.stderr + resumed.stderr))
    return result


# ----------------------------------------------------------------------------------------------------
# 2. One full-size step, each variant in a fresh process; the memory plan beside it
# ----------------------------------------------------------------------------------------------------


def step_config(variant: str, size: dict, device: str, output_dir: str):
    """The measured step's r2m.R2MConfig: the size's settings, the loop's defaults for the rest (as a run has them)."""
    import r2m

    keys = set(r2m.R2MConfig.__dataclass_fields__)
    return r2m.R2MConfig(**{k: v for k, v in size.items() if k in keys}, reward=variant, device=device,
                         total_trajectories=2 * size["queries_per_step"] * size["group_size"], save_every=0,
                         sample_every=0, overwrite=True, output_dir=output_dir, seed=0)


def step_prompts(size: dict, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The check's prompts (random tokens, lengths drawn from the size's distribution) -> them, and the lengths of the
    measured step's (the second step's) prompts, which the memory plan counts that step's work on."""
    import random

    from plumbing.data import step_prompt_indices

    n = size["queries_per_step"]
    rng = random.Random(0)
    prompts = [[rng.randrange(1, vocab) for _ in range(length)]
               for length in configs.prompt_lengths(4 * n, *size["prompt_lengths"], seed=0)]
    return prompts, [len(prompts[i]) for i in step_prompt_indices(len(prompts), n, 1, 0)]


def measure(variant: str, size: dict, device: str, config: str, tiny: bool, output_dir: str) -> dict:
    """In a fresh process: build the models from `config` (random weights, on the device), run a warm-up and a
    measured step of `r2m.train`, and report the measured step's phases. The phases are timed and their peak memory
    read around r2m's own functions (patched here only)."""
    import copy
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import r2m
    from launch import runner

    torch.manual_seed(0)
    model_config = configs.model_config(config, tiny=tiny, num_labels=1)
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
    prompts, _ = step_prompts(size, model_config.vocab_size)
    # pad 0; an EOS id outside the vocabulary is never sampled, so every response has max_new_tokens tokens
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=model_config.vocab_size + 1, decode=lambda *a, **k: "")
    params = sum(p.numel() for p in policy.parameters()) - policy.get_input_embeddings().weight.numel()
    reward_model = runner.build_reward(cfg, rm, policy)
    history = r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, cfg)
    measured = history[-1]
    return {
        "variant": variant, "build_seconds": build_seconds, "step_seconds": measured["time/step"],
        "response_length": measured["response/length"], "policy_params": params,
        "gradient_checkpointing": cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing,
        "phases": {name: v for (s, name), v in phases.items() if s == 1},
    }


def start_plan(variant: str, size: dict, config: str, folder: str) -> tuple[subprocess.Popen, str]:
    """The memory plan's prediction for the same flags (as on a GPU), computed on the CPU by its own command while
    the device measures: memory for the longest prompts, the measured step's work on its own prompts' lengths ->
    (the running process, the JSON file it writes)."""
    out, lengths = os.path.join(folder, f"plan_{variant}.json"), os.path.join(folder, "step_prompt_lengths.json")
    with open(lengths, "w") as f:
        json.dump(step_prompts(size, vocab=2)[1], f)
    cfg = step_config(variant, size, "cpu", os.path.join(folder, f"plan_{variant}"))
    flags = {k: getattr(cfg, k) for k in ("queries_per_step", "group_size", "max_new_tokens", "generation_batch_size",
                                          "forward_batch_size", "micro_batch_size", "checkpoint_layers",
                                          "policy_minibatch_size", "rm_minibatch_groups", "d_attn", "total_trajectories",
                                          "reward", "output_dir")}
    flags.update(max_prompt_tokens=size["prompt_lengths"][1], prompt_lengths=lengths, policy_config=config,
                 reward_config=config, json_out=out)
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "memory_plan.py"),
               *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def finish_plan(process: subprocess.Popen, out: str, budget: Budget) -> dict:
    """What the plan predicts per phase of this check (step 2 of the plan: the steady state, as the measured step);
    the plan is given what the budget has left, then stopped."""
    try:
        _, stderr = process.communicate(timeout=budget.left())
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": "the memory plan did not finish within the budget"}
    if process.returncode != 0:
        return {"error": f"the memory plan failed ({exit_description(process.returncode)}): {last_lines(stderr)}"}
    with open(out) as f:
        plan = json.load(f)
    peaks = {name: max(plan["peaks"]["2"][p] for p in phases) for name, phases in PLAN_PHASES.items()}
    return {"peaks": peaks, "host": plan["host"], "verdict": plan["verdict"], "cost": plan["cost"],
            "constants": plan["constants"]}


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


def summarise(measured: dict, size: dict, flops: float, device_name: str) -> dict:
    """Per-trajectory rates -> tokens/s, MFU, the full default step and run; R2M / vanilla ratios."""
    N = size["queries_per_step"] * size["group_size"]
    full_N = DEFAULT_RUN["queries_per_step"] * DEFAULT_RUN["group_size"]
    out = {}
    for variant, m in measured.items():
        if "error" in m:
            out[variant] = {"error": m["error"]}
            continue
        prompt_lengths = step_prompts(size, vocab=2)[1]
        tokens = N * (sum(prompt_lengths) / len(prompt_lengths) + m["response_length"])
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
    parts = report["parts"]
    failed = [p for p, r in parts.items() if not r["ok"]]
    lines.append(f"- parts: {len(parts) - len(failed)} of {len(parts)} ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    built = parts.get("configs", {}).get("configs", {})
    if built:
        lines.append("- configs: " + "; ".join(f"{k} {v}" for k, v in built.items()))
    for script in ("train_tldr.py", "train_ultrafeedback.py"):
        s = parts.get(f"smoke {script}")
        if s:
            lines.append(f"- smoke `{script}` on {report['device_type']} (from_pretrained, --bf16 true, killed in step 1's "
                         f"save, resumed): {'ok' if s['ok'] else 'FAILED: ' + s['error']}, steps {s.get('steps')}, "
                         f"{s.get('seconds', 0):.0f} s")
    size = report["size"]
    cfg = step_config("r2m", size, "cpu", "unused")
    low, high = size["prompt_lengths"]
    lines += ["", f"One step of {size['queries_per_step']} prompts x {size['group_size']} (prompts of {low}-{high} tokens + "
              f"{size['max_new_tokens']} new tokens; generation {cfg.generation_batch_size}, forward "
              f"{cfg.forward_batch_size}, micro {cfg.micro_batch_size}, {cfg.checkpoint_layers} checkpointed layers), the "
              "second of a fresh process:", "",
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
    lines += against_the_plan(measured.get("r2m", {}), plans.get("r2m", {}))
    host = plans.get("r2m", {}).get("host")
    if host:
        lines.append(f"- host memory (plan, this step size): models {host['models'] / GiB:.1f} GiB before they move to the "
                     f"device, hidden states {host['hidden'] / GiB:.2f} GiB pinned")
    return "\n".join(lines)


def against_the_plan(measured: dict, plan: dict) -> list[str]:
    """How far the memory plan's two constants (forward/backward FLOP/s, seconds per decode step) were off, from
    R2M's measured step and the plan's count of the same step's work."""
    cost, phases = plan.get("cost"), measured.get("phases")
    if not cost or not phases:
        return []
    rates = [f"{phase} {cost['flops'][phase] / phases[phase]['seconds'] / 1e12:.3g}"
             for phase in ("old/ref log-probs", "RM annotation", "policy update") if phases.get(phase, {}).get("seconds")]
    flops_per_second, decode = plan["constants"]["flops_per_second"], plan["constants"]["decode_step_seconds"]
    generation = phases.get("generation", {}).get("seconds", 0.0)
    decode_ms = (generation - cost["flops"]["generation"] / flops_per_second) / max(1, cost["decode_steps"]) * 1e3
    return [f"- against the plan's constants (R2M): forward/backward work at {', '.join(rates)} TFLOP/s (assumed: "
            f"{flops_per_second / 1e12:.0f}); decoding at {decode_ms:.0f} ms a step of a generation batch (assumed: "
            f"{decode * 1e3:.0f}); the step {measured['step_seconds']:.1f} s against {cost['step_seconds']:.1f} s "
            f"predicted ({measured['step_seconds'] / cost['step_seconds']:.2f}x)"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="'full' (Pythia-2.8B's size, for a GPU) or 'tiny' (its config file cut to a tiny size).")
    parser.add_argument("--device", default="cuda", help="'cuda' or 'cpu'.")
    parser.add_argument("--rehearse", action="store_true",
                        help="The full size's code path on the CPU at tiny sizes (--size tiny --device cpu, and every "
                             "shipped config also cut to a tiny size and run): what to pass before renting a GPU.")
    parser.add_argument("--output_dir", default="runs/gpu_check",
                        help="Where results.jsonl (a line per part, as each ends), gpu_check.json and gpu_check.md go.")
    parser.add_argument("--budget_seconds", type=float, default=330,
                        help="The time every part, child process and subprocess shares: none is given more than is "
                             "left. Default 330 s: the whole check within 6 minutes, start-up included.")
    parser.add_argument("--step_config", default=os.path.join(ROOT, "benchmarks", "configs", STEP_CONFIG),
                        help="Config file of the policy and RM of the measured step (default: Pythia-2.8B's).")
    args = parser.parse_args(argv)
    if args.rehearse:
        args.size, args.device = "tiny", "cpu"
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is visible; on a CPU run --rehearse")
    if args.device == "cpu" and args.size == "full":
        raise SystemExit("error: --size full on a CPU would take hours; on a CPU run --rehearse (or --size tiny)")
    budget = Budget(args.budget_seconds)
    results = Results(args.output_dir, budget)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    size = dict(SIZES[args.size])
    tiny = args.size == "tiny"
    report = {"device": device_name, "device_type": args.device, "torch": torch.__version__,
              "transformers": transformers.__version__, "size": size, "parts": results.parts, "measured": {}, "plan": {}}
    print(f"gpu check: {device_name}, torch {torch.__version__}, transformers {transformers.__version__}; budget "
          f"{args.budget_seconds:.0f} s; results as each part ends: {results.path}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results.add("configs", check_configs(rehearse=tiny))
        step_config_file = args.step_config
        if tiny:  # the plan reads a config file: the cut one, through the same function
            step_config_file = os.path.join(tmp, "tiny_" + os.path.basename(args.step_config))
            configs.model_config(args.step_config, tiny=True).to_json_file(step_config_file)
        # the memory plan needs only the CPU: it runs while the device measures
        planners = {v: start_plan(v, size, step_config_file, tmp) for v in ("vanilla", "r2m")}
        try:
            for script in ("train_tldr.py", "train_ultrafeedback.py"):
                results.add(f"smoke {script}", smoke(script, os.path.join(tmp, script.split(".")[0]), args.device, budget))
            variants = ["vanilla", "r2m"]
            for i, variant in enumerate(variants):
                # a fair share of what is left, so the first variant cannot starve the second
                share = budget.left() / (len(variants) - i)
                m = run_child(measure, (variant, size, args.device, args.step_config, tiny,
                                        os.path.join(tmp, f"step_{variant}")), timeout=share,
                              log=os.path.join(tmp, f"step_{variant}.log")) \
                    if share >= 1 else {"error": "not started: out of the budget's time"}
                report["measured"][variant] = m
                results.add(f"step {variant}", {k: v for k, v in m.items() if k != "phases"} if "error" in m else
                            {"step_seconds": round(m["step_seconds"], 3), "phases": m["phases"]})
            for variant, (process, out) in planners.items():
                report["plan"][variant] = results.add(f"memory plan {variant}", finish_plan(process, out, budget))
        finally:
            for process, _ in planners.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
    flops = matmul_flops(args.device)
    report["measured_matmul_tflops"] = flops / 1e12
    results.add("matmul", {"tflops": round(flops / 1e12, 3)})
    report["summary"] = summarise(report["measured"], size, flops, device_name)
    report["seconds"] = budget.elapsed()
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    markdown = table(report)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown + "\n")
    print("\n" + markdown, flush=True)
    failed = [p for p, r in report["parts"].items() if not r["ok"]]
    if failed:
        raise SystemExit(f"error: {len(failed)} part(s) of the check failed: {', '.join(failed)} (see {results.path})")
    return report


if __name__ == "__main__":
    main()
