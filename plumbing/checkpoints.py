"""Checkpoints of an r2m run, its metrics file, and the rules that keep a run from being lost (docs/crashes.md).

A checkpoint folder counts once its completeness marker, written last, is there; a crash at any moment leaves a
complete checkpoint (`checkpoint/`, or `.old` / `.tmp` between the two renames of a save); nothing non-finite
is saved (an update whose gradients are not finite is skipped, and a run of such steps stops); a run resumes only
under settings that keep its saved state right. `r2m.train` calls these; they hold no part of the algorithm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import warnings
from typing import Optional

import torch

from plumbing import distributed


CHECKPOINT_DIR = "checkpoint"
COMPLETE_MARKER = "complete.json"  # {"step", "config"}, written last
# A resumed run may change these, from its first step on: a new length re-times ω(t) and the lr decay over the
# new T; new learning rates restart the linear decay from the new peak; the rest is speed and bookkeeping.
RESUME_MAY_CHANGE = {"total_trajectories", "policy_lr", "rm_lr", "generation_batch_size", "forward_batch_size",
                     "micro_batch_size", "bf16", "gradient_checkpointing", "checkpoint_layers", "cache_weight_casts",
                     "device", "save_every", "sample_every", "max_nonfinite_steps", "output_dir", "resume", "overwrite",
                     "merge_on_save"}
# BRME's heads and the Pretrained RM's body were fitted with these before RL and come back with the checkpoint.
# Every other setting must match: it shapes a saved tensor (d_attn, brme_heads), what step t is (queries_per_step,
# group_size) or the objective.
RESUME_FROM_CHECKPOINT = {"brme_preference_file", "brme_epochs", "brme_lr", "brme_sigma_prior",
                          "pretrain_rm_preference_file", "pretrain_rm_epochs", "pretrain_rm_lr", "pretrain_rm_batch_size"}


class TrainingError(RuntimeError):
    """A run that must not go on (its folder, its settings, non-finite values); the message is one line."""


def _marker(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent, or the save stopped before writing it


def find_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint among checkpoint/, checkpoint.old/ and checkpoint.tmp/: a crash between the
    two renames of `save_checkpoint` leaves no checkpoint/ but a complete .old (and maybe a complete .tmp)."""
    found = [(m["step"], path) for path in (os.path.join(output_dir, CHECKPOINT_DIR + s) for s in ("", ".old", ".tmp"))
             if (m := _marker(path)) is not None]
    return max(found, key=lambda f: f[0])[1] if found else None


def has_checkpoint(output_dir: str) -> bool:
    return find_checkpoint(output_dir) is not None


def resume_notes(saved: dict, cfg, fitted_before_rl: str = "") -> list[str]:
    """Notes on the settings this resumed run changes; a TrainingError for one it may not change.
    saved: the checkpoint's settings; cfg: this run's (a dataclass); fitted_before_rl: what the run's reward mode
    fitted before RL and the checkpoint holds ("the fitted BRME heads", "the fine-tuned RM"), or "" for nothing."""
    notes = []
    for key, was in saved.items():
        now = getattr(cfg, key, was)
        if now == was or key in ("output_dir", "resume", "overwrite"):
            continue
        if key in RESUME_FROM_CHECKPOINT:
            if fitted_before_rl:
                notes.append(f"--{key} {now} is not used: the checkpoint holds {fitted_before_rl} ({key} was {was})")
        elif key in RESUME_MAY_CHANGE:
            notes.append(f"--{key} {now} (the checkpoint's: {was}) applies from this step on")
        else:
            raise TrainingError(f"{cfg.output_dir} was written with --{key} {was}, not {now}; resume with "
                                f"--{key} {was}, or start over with --overwrite true or another --output_dir")
    return notes


def check_output_dir(cfg) -> None:
    """Before anything loads: a fresh run never writes over a run, a resumed one needs its checkpoint and settings."""
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    holds_metrics = os.path.isfile(metrics) and os.path.getsize(metrics) > 0
    checkpoint = find_checkpoint(cfg.output_dir)
    if not cfg.resume and not cfg.overwrite and (checkpoint or holds_metrics):
        raise TrainingError(f"{cfg.output_dir} already holds a run; continue it with --resume true, or start over "
                            "with --overwrite true (deletes it) or another --output_dir")
    if cfg.resume and checkpoint is None and holds_metrics:
        raise TrainingError(f"--resume: {cfg.output_dir} holds metrics.jsonl but no complete checkpoint to resume "
                            "from; start over with --overwrite true or another --output_dir")
    if cfg.resume and checkpoint is not None:
        resume_notes(_marker(checkpoint)["config"], cfg)  # raises for a setting that must match


def nonfinite_tensors(state, name: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list state that hold a NaN or an inf."""
    if torch.is_tensor(state):
        return [name] if state.is_floating_point() and not torch.isfinite(state).all() else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return [bad for k, v in items for bad in nonfinite_tensors(v, f"{name}.{k}" if name else str(k))]


def save_checkpoint(output_dir: str, step: int, policy, tokenizer, reward_model, optimizers: dict, schedulers: dict,
                    cfg) -> str:
    """Write output_dir/checkpoint atomically: a crash while saving leaves the previous checkpoint intact.
    policy/ is a Hugging Face folder (eval_judge.py and from_pretrained read it); state.pt holds the rest.
    cfg: the run's config (a dataclass), recorded whole."""
    final = os.path.join(output_dir, CHECKPOINT_DIR)
    # --- distributed: gather the full (unsharded) policy, its optimiser state and a trained RM body (collectives:
    # every rank takes part); rank 0 alone writes, and if it fails every rank stops with it ---
    policy_weights, policy_optimizer = distributed.policy_state(policy, optimizers["policy"])
    reward_state = reward_model.trainable_state_dict()
    state = {
        "step": step,  # last completed step
        "config": dataclasses.asdict(cfg),
        "reward_model": reward_state,
        "optimizers": {k: policy_optimizer if k == "policy" else o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "rng": {
            "torch": torch.get_rng_state(),
            # this process's own device only: a resume may see fewer GPUs (every rank restores rank 0's state)
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        },
    }
    distributed.on_main_process(lambda: _write(output_dir, step, policy, tokenizer, policy_weights, state, cfg),
                                TrainingError)
    return final


def _write(output_dir: str, step: int, policy, tokenizer, policy_weights: dict, state: dict, cfg) -> None:
    """save_checkpoint's files, written by one process: checkpoint.tmp/, its marker last, then the swap."""
    final = os.path.join(output_dir, CHECKPOINT_DIR)
    tmp = final + ".tmp"
    bad = nonfinite_tensors({"policy": policy_weights, **state})
    if bad:
        raise TrainingError(f"step {step}: not saving a checkpoint with {len(bad)} non-finite tensors (first: {bad[0]}); "
                            f"the last good one stays in {find_checkpoint(output_dir) or 'nowhere yet'}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_saves():
            if hasattr(policy, "peft_config"):  # LoRA (lora.py): the adapter, and a merged policy/ with --merge_on_save
                from plumbing import lora

                lora.save_adapter(policy, tokenizer, tmp, cfg.merge_on_save)
            else:
                policy.save_pretrained(os.path.join(tmp, "policy"), state_dict=policy_weights)
                if tokenizer is not None:
                    tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            json.dump({"step": step, "config": state["config"]}, f)
    except Exception as e:  # noqa: BLE001 - disk full, permissions, a serialiser's own error: one line, nothing lost
        raise TrainingError(f"step {step}: could not write {tmp}: {type(e).__name__}: {str(e).splitlines()[0]}; "
                            f"the last complete checkpoint is untouched") from e
    _swap_in(tmp, final, step)


@contextlib.contextmanager
def quiet_saves():
    """transformers draws a "Writing model shards" progress bar in every save_pretrained: not among the step lines."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _swap_in(src: str, final: str, step: int) -> None:
    """checkpoint/ -> checkpoint.old/, then src -> checkpoint/. Between the two renames no checkpoint/ exists, but
    src and .old are both complete, and `find_checkpoint` finds the newer one."""
    old = final + ".old"
    if src != old:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
    if os.environ.get("R2M_TEST_KILL_BETWEEN_RENAMES") == str(step):  # crash-injection hook, set by tests only
        os.kill(os.getpid(), 9)
    shutil.rmtree(final, ignore_errors=True)  # gone already, unless src is .old beside an unmarked checkpoint/
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(output_dir: str, policy, reward_model, optimizers: dict, schedulers: dict, cfg,
                    fitted_before_rl: str = "") -> int:
    """Restore the newest complete checkpoint; returns the next step to run. A save that a crash interrupted is
    finished first (the newest complete folder becomes checkpoint/), so the next save starts from a clean layout.
    fitted_before_rl: what the run's reward mode fitted before RL, if anything (for the notes, see resume_notes)."""
    final = os.path.join(output_dir, CHECKPOINT_DIR)

    def repair() -> None:
        path = find_checkpoint(output_dir)
        if path != final:
            _repair(path, final)

    # --- distributed: rank 0 alone repairs, once every rank has looked at the layout (a rank looking during the
    # renames could find no checkpoint at all; one looking after would skip the collective rank 0 waits in); the
    # others wait, then read the repaired one ---
    distributed.barrier()
    distributed.on_main_process(repair, TrainingError)
    distributed.barrier()
    for note in resume_notes(_marker(final)["config"], cfg, fitted_before_rl):
        distributed.print0(f"note: {note}")
    # mmap: every rank reads the small entries; the policy's optimiser state is only read on rank 0
    state = torch.load(os.path.join(final, "state.pt"), map_location="cpu", weights_only=False, mmap=True)
    if hasattr(policy, "peft_config") or os.path.isdir(os.path.join(final, "adapter")):  # LoRA (lora.py)
        from plumbing import lora

        lora.load_adapter(policy, final)
        weights = policy.state_dict()  # the adapter is in; what follows restores the optimiser state
    elif distributed.is_main_process():
        weights = type(policy).from_pretrained(os.path.join(final, "policy"), dtype=torch.float32).state_dict()
    else:  # --- distributed: only rank 0's copy is broadcast, so the others do not load the full policy ---
        weights = {}
    # --- distributed: full weights and optimiser state into a plain or sharded policy, any number of ranks ---
    distributed.load_policy_state(policy, optimizers.get("policy"), weights, state["optimizers"].get("policy"))
    del weights
    reward_model.load_trainable_state_dict(state["reward_model"])
    for k, o in optimizers.items():
        if k != "policy":
            o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
        # The learning rate in effect comes from this run's flags (they may change on resume), decayed over this T.
        lr = cfg.policy_lr if k == "policy" else cfg.rm_lr
        s.base_lrs = [lr] * len(s.base_lrs)
        for group in optimizers[k].param_groups:
            group["initial_lr"], group["lr"] = lr, lr * s.lr_lambdas[0](s.last_epoch)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        cuda = state["rng"]["cuda"]  # this process's device (a list of every device's in checkpoints before that)
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)
    random.setstate(state["rng"]["python"])
    return state["step"] + 1


def _repair(path: str, final: str) -> None:
    distributed.print0(f"note: {path} is the newest complete checkpoint (a save was interrupted); it becomes {final}")
    _swap_in(path, final, -1)


class SkipNonFiniteSteps:
    """An optimiser whose step is skipped, and counted, when its gradients are not all finite: one NaN step would
    poison the weights and every later checkpoint. All else is the wrapped optimiser's."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.skipped = optimizer, 0

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Asked as "any non-finite?" so that a fake-tensor run (benchmarks/memory_plan.py reads every bool as False)
        # takes the step, as a healthy run does.
        if grads and bool(~torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()


class NonFiniteStreak:
    """Steps in a row with a non-finite reward, loss or gradient norm (their updates skipped, see
    SkipNonFiniteSteps). After `max_steps` of them the run stops, naming the step and the quantity; it also stops
    when it ends on one: its last updates were skipped and no checkpoint holds them, so it must not look like a
    finished run (exit 0)."""

    def __init__(self, max_steps: int):
        self.max_steps, self.count = max_steps, 0

    def __bool__(self) -> bool:  # true while the last step had a non-finite value: no state to checkpoint
        return self.count > 0

    def update(self, record: dict, step: int, last_step: int) -> None:
        bad = next((k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)), None)
        self.count = self.count + 1 if bad or record["nonfinite/skipped_updates"] else 0
        if self.count >= self.max_steps or (self.count and step == last_step):
            raise TrainingError(f"step {step}: {bad or 'a gradient norm'} was not finite in {self.count} steps in a row "
                                "(updates skipped)" + ("" if self.count >= self.max_steps else ", and the run ended there")
                                + "; lower --policy_lr / --rm_lr or check the reward model, then resume from the last "
                                "good checkpoint with --resume true")


def delete_checkpoints(output_dir: str) -> None:
    """--overwrite true: the run's checkpoints go (its metrics are started over by `start_metrics`)."""
    def delete() -> None:
        for suffix in ("", ".old", ".tmp"):
            shutil.rmtree(os.path.join(output_dir, CHECKPOINT_DIR + suffix), ignore_errors=True)

    distributed.on_main_process(delete, TrainingError)  # --- distributed: rank 0 deletes, the others wait for it ---


def start_metrics(path: str, start: int) -> None:
    """metrics.jsonl as the run starts at step `start`: a fresh run starts a new curve; a resumed one keeps the steps
    its checkpoint covers and drops any written after it (a crash between checkpoints), since those steps run
    again. A line a crash cut short is always such a step: it cannot be parsed, and it goes too. Rank 0 only."""
    if distributed.is_main_process() and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if _metric_step(line) < start]
        with open(path, "w") as f:
            f.writelines(kept)


def append_metrics(path: str, record: dict) -> None:
    """One line of metrics.jsonl, written by rank 0 (if that fails, every rank stops). Strict JSON: a non-finite
    value is written as null."""
    line = json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()})

    def write() -> None:
        with open(path, "a") as f:
            f.write(line + "\n")

    distributed.on_main_process(write, TrainingError)


def _metric_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # blank, or cut short by a crash


# ----------------------------------------------------------------------------------------------------
# What r2m.train calls: the run's start, the end of each step, and what a checkpoint keeps of the reward model
# ----------------------------------------------------------------------------------------------------


def start_run(cfg, policy, reward_model, optimizers: dict, schedulers: dict, resuming: bool) -> tuple[int, str]:
    """The run's folder and its first step: a fresh run (after --overwrite deleted the old one), or the newest complete
    checkpoint's next step; metrics.jsonl started, or cut to the steps that checkpoint covers -> (step, its path)."""
    check_output_dir(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    start = 0
    if cfg.overwrite:
        delete_checkpoints(cfg.output_dir)
    if resuming:
        start = load_checkpoint(cfg.output_dir, policy, reward_model, optimizers, schedulers, cfg,
                                getattr(reward_model, "fit_description", ""))
        distributed.decorrelate_rng()  # --- distributed: ranks restored rank 0's generator; one stream each ---
        distributed.print0(f"resumed from {cfg.output_dir}/{CHECKPOINT_DIR} at step {start}/{cfg.total_steps}")
    elif cfg.resume:
        distributed.print0(f"--resume: {cfg.output_dir} holds no run yet: starting a new run at step 0")
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    start_metrics(metrics, start)
    return start, metrics


def step_schedulers(schedulers: dict) -> None:
    """Each learning-rate schedule advances once per RL step. A first update skipped for a non-finite gradient is no
    misordering (the schedule is still per step), so PyTorch's warning about it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step..")
        for s in schedulers.values():
            s.step()


def count_skipped(guarded: dict) -> int:
    """The optimiser steps the step's SkipNonFiniteSteps skipped, counted from zero again for the next step."""
    skipped = sum(g.skipped for g in guarded.values())
    for g in guarded.values():
        g.skipped = 0
    return skipped


def end_step(record: dict, step: int, cfg, nonfinite: "NonFiniteStreak", policy, tokenizer, reward_model,
             optimizers: dict, schedulers: dict) -> None:
    """After a step's metrics are out: --max_nonfinite_steps steps in a row with a non-finite value stop the run (as
    does ending on one); then a checkpoint every --save_every steps and at the end, never of a non-finite step."""
    nonfinite.update(record, step, last_step=cfg.total_steps - 1)
    if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step == cfg.total_steps - 1):
        if nonfinite:
            distributed.print0(f"step {step}: no checkpoint after non-finite values; the last good one stays")
        else:
            save_checkpoint(cfg.output_dir, step, policy, tokenizer, reward_model, optimizers, schedulers, cfg)


def heads_state_dict(reward_model) -> dict:
    """What a checkpoint keeps of an R2M reward model (`r2m.R2MRewardModel.trainable_state_dict`): its cross-attention
    and score head, and its body's full weights when the body was trained (the Pretrained RM, the whole-RM baseline);
    then under torchrun a collective, so every process calls it."""
    state = {"policy_feedback": reward_model.policy_feedback.state_dict(), "score_head": reward_model.score_head.state_dict()}
    body = reward_model.reward_model.base_model
    if reward_model.save_body or any(p.requires_grad for p in body.parameters()):
        state["body"] = distributed.full_state_dict(body)  # --- distributed: a sharded body is gathered whole ---
    return state


def load_heads_state_dict(reward_model, state: dict) -> None:
    """The inverse of heads_state_dict (`r2m.R2MRewardModel.load_trainable_state_dict`)."""
    reward_model.policy_feedback.load_state_dict(state["policy_feedback"])
    reward_model.score_head.load_state_dict(state["score_head"])
    if "body" in state:
        # --- distributed: rank 0's full copy, each process keeping its own shard ---
        distributed.load_full_state_dict(reward_model.reward_model.base_model, state["body"])
