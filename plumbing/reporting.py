"""What a run shows while it trains, on rank 0: a progress bar, one line per step, and every few steps a few
(prompt, response, reward) samples; `r2m.train` calls these, and hands the same samples to the tracker."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from plumbing import distributed


def progress_bar(start: int, total: int, description: str) -> tqdm:
    return tqdm(range(start, total), initial=start, total=total, desc=description, dynamic_ncols=True,
                disable=not distributed.is_main_process())


def show_step(bar: tqdm, record: dict) -> None:
    """The step's one line: reward, KL to the reference per response, response length, ω, the GREBT loss (when
    the reward model trains) and the step's seconds; the bar shows the first three."""
    bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl/sequence']:.3f}", omega=f"{record['omega']:.2f}")
    distributed.print0(
        f"step {record['step']:4d} | reward {record['reward/mean']:+.4f} | kl {record['kl/sequence']:.4f} | "
        f"len {record['response/length']:.1f} | ω {record['omega']:.3f}"
        + (f" | grebt {record['rm/grebt']:.4f}" if "rm/grebt" in record else "")
        + f" | {record['time/step']:.1f}s"
    )


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
