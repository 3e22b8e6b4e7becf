"""What a run shows and records while it trains: each step's metrics record (what metrics.jsonl and a tracker get), a
progress bar, one line per step on rank 0, and every few steps a few (prompt, response, reward) samples. `r2m.train`
calls these; they compute nothing the step trains on."""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from plumbing import distributed


def step_record(step: int, omega_t: float, rewards: torch.Tensor, rm_rewards: torch.Tensor,
                baseline: Optional[torch.Tensor], trajectories, group_size: int, stats: dict, times: list[float]) -> dict:
    """A step's metrics: rewards (N,) (what the policy was trained on) and rm_rewards (N,) (the RM's own), ReMax's
    baseline (n,) or None, responses, KL to the reference (per response, and per token as the paper's Fig. 5), the
    updates' `stats`, how much of the reward's spread the policy feedback carries, and the phases' seconds
    (`times`: the step's start and the ends of sampling, annotation, the policy update and the RM update)."""
    lengths = trajectories.response_mask.sum(1).float()  # (N,)
    kl = ((trajectories.old_logprobs - trajectories.ref_logprobs) * trajectories.response_mask).sum(1)  # (N,)
    record = {
        "step": step, "omega": omega_t, "reward/mean": rewards.mean().item(),
        "reward/std": distributed.gather_rows(rewards).std().item(),  # --- distributed: over all ranks ---
        "reward/rm_mean": rm_rewards.mean().item(),
        "reward/group_std": rewards.view(-1, group_size).std(dim=1).mean().item() if group_size > 1 else 0.0,
        **({"reward/greedy_mean": baseline.mean().item()} if baseline is not None else {}),
        "response/length": lengths.mean().item(), "response/eos_frac": trajectories.contains_eos.float().mean().item(),
        "kl/sequence": kl.mean().item(), "kl/token": (kl.sum() / lengths.sum().clamp_min(1)).item(),
        **stats,
    }
    if trajectories.hidden is not None:  # Var((1 - ω)·w·Ĥ) / Var(r): 0 at ω = 1
        share = trajectories.reward_from_feedback.var() / rm_rewards.var().clamp_min(1e-12)
        record["feedback/reward_var_share"] = share.item()
    phases = ("rollout", "reward", "policy", "reward_model")
    record.update({f"time/{p}": b - a for p, a, b in zip(phases, times, times[1:])}, **{"time/step": times[-1] - times[0]})
    return record


@torch.no_grad()
def cross_attention_change(reward_model, at_start: Optional[list]) -> dict:
    """‖θ - θ₀‖ / ‖θ₀‖ of the cross-attention since it was built (`at_start`: its parameters then, or None for a mode
    without policy feedback): is R2M's mechanism engaged?"""
    if at_start is None:
        return {}
    params = list(reward_model.policy_feedback.parameters())
    delta = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(params, at_start)))
    origin = torch.sqrt(sum((p0**2).sum() for p0 in at_start))
    return {"feedback/attn_rel_change": (delta / origin).item()}


def progress_bar(start: int, total: int, description: str) -> tqdm:
    return tqdm(range(start, total), initial=start, total=total, desc=description, dynamic_ncols=True,
                disable=not distributed.is_main_process())


def show_step(bar: tqdm, record: dict, tokenizer, prompts: list[list[int]], trajectories, rewards: torch.Tensor,
              group_size: int, samples: bool) -> list[dict]:
    """The step's one line (reward, KL to the reference per response, response length, ω, the GREBT loss when the RM
    trains, the step's seconds; the bar shows the first three), and with `samples` the first response of the first
    two groups -> those samples [{prompt, response, reward}] (empty without)."""
    bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl/sequence']:.3f}", omega=f"{record['omega']:.2f}")
    distributed.print0(
        f"step {record['step']:4d} | reward {record['reward/mean']:+.4f} | kl {record['kl/sequence']:.4f} | "
        f"len {record['response/length']:.1f} | ω {record['omega']:.3f}"
        + (f" | grebt {record['rm/grebt']:.4f}" if "rm/grebt" in record else "")
        + f" | {record['time/step']:.1f}s"
    )
    return show_samples(tokenizer, prompts, trajectories.query_responses, trajectories.response_mask,
                        trajectories.prompt_len, rewards, group_size) if samples else []


def show_samples(tokenizer, prompts: list[list[int]], query_responses: torch.Tensor, response_mask: torch.Tensor,
                 prompt_len: int, rewards: torch.Tensor, group_size: int, count: int = 2) -> list[dict]:
    """The first response of the first `count` groups, printed -> [{prompt, response, reward}].
    prompts: this process's prompts (token ids); query_responses (N, P + R); response_mask (N, R); rewards (N,)."""
    samples = []
    for row in range(0, min(count * group_size, len(prompts) * group_size), group_size):
        prompt = tokenizer.decode(prompts[row // group_size], skip_special_tokens=True)
        response = tokenizer.decode(query_responses[row, prompt_len:][response_mask[row].bool()], skip_special_tokens=True)
        distributed.print0(f"  [sample] ...{prompt[-120:]!r} -> {response!r}  reward {rewards[row].item():+.3f}")
        samples.append({"prompt": prompt, "response": response, "reward": rewards[row].item()})
    return samples
