"""R2M: Real-Time Aligned Reward Model, in one readable module.

Paper: "Real-Time Aligned Reward Model beyond Semantics", Huang et al., ICML 2026, arXiv:2601.22664.
Baseline beside it: BRME, "Reward-Robust RLHF in LLMs", Yan et al., arXiv:2409.15360 (in `brme.py`, a reward
mode of this same loop).

What R2M does, in one breath: RLHF policies learn to exploit a frozen reward model. R2M keeps the reward
model's (RM's) LLM body frozen but lets it *see the policy*: a small sequence-to-token cross-attention
reads the policy's last-layer hidden states h, its output is blended with the RM's usual reward-token
embedding by a schedule ω(t), and only that cross-attention and the score head are retrained after every
RL step with the GREBT loss (Bradley-Terry on self-labelled pairs + group reward entropy).

This file reads in the order of the paper's Algorithm 1:
    §1 config                      `R2MConfig`
    §2 the formulas                Eq. 1 `rloo_advantages`, GRPO `grpo_advantages` (and the baselines'
                                   `remax_advantages`, `reinforce_pp_advantages`), Eq. 2 `policy_loss`,
                                   Eq. 4 `omega`, Eq. 5 `bradley_terry_loss`, Eq. 6 `group_reward_entropy`,
                                   Eq. 7 `grebt_loss`
    §3 the reward model            `HiddenStateCapture`, Eq. 3 `PolicyFeedbackAttention`,
                                   Eq. 3-4 `R2MRewardModel`, the Pretrained-RM baseline's fine-tuning, the
                                   reward modes table `REWARD_MODES`
    §4 one training step           1 `rollout` (sampling + old/ref log-probs + hidden states; ReMax's
                                   `greedy_baseline`)  2 `annotate_rewards`  3 `compute_advantages` (`ALGOS`)
                                   4 `policy_update`  5 `reward_model_update` (GREBT)
    §5 the loop                    `train` (set-up, the steps, metrics and diagnostics, checkpoints)

What the loop leans on but is not the algorithm lives in plumbing/ (imported below, never importing this file):
checkpoints and metrics files, resuming, non-finite guards (`plumbing.checkpoints`), N processes
(`plumbing.distributed`: the lines marked `--- distributed`), devices, precision, host memory and the models' set-up
(`plumbing.devices`), batches and the RM's view of a trajectory (`plumbing.data`), console output
(`plumbing.reporting`) and flag ranges (`plumbing.flag_ranges`).

Departures from the textbook algorithm, each a "Choice:" written again where it is made:
- The RM body is frozen, so a sample's reward-token embedding H_last does not change within a step. We
  compute it once, at reward annotation, and the GREBT step reuses it: the RM step costs no RM forward.
- The same clipped surrogate and in-loss k3 KL for RLOO and GRPO; only the advantage estimator differs.
- Loss aggregation: mean over response tokens per sequence, then mean over sequences.
- Trainable weights (policy, cross-attention, score head) are kept in float32 and run under bf16
  autocast with --bf16 (the default on GPU); frozen models (reference policy, RM body) are stored in bf16 then.
- Dropout is switched off in every model: the PPO ratio must be exactly 1 before the first update.

Single-GPU command (Pythia-2.8B on TL;DR, the paper's settings):  python train_tldr.py
Tiny offline run on CPU (< 2 minutes):                           python train_tldr.py --preset tiny
Several GPUs (data-parallel, FSDP2; plumbing/distributed.py):   torchrun --nproc_per_node 8 train_tldr.py
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# plumbing/: what the loop leans on, none of it the algorithm. devices: where tensors live and in what precision;
# distributed: FSDP2 / torchrun helpers, each a no-op on one process; data: batches and the RM's view of a
# trajectory; checkpoints: checkpoint and metrics files, resuming, non-finite guards; reporting: the console
from plumbing import devices, distributed, flag_ranges, reporting
from plumbing.checkpoints import (
    CHECKPOINT_DIR,
    NonFiniteStreak,
    SkipNonFiniteSteps,
    TrainingError,
    append_metrics,
    check_output_dir,
    delete_checkpoints,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    start_metrics,
)
from plumbing.data import RMView, pad_left, pad_token_id, rm_inputs, step_prompt_indices
from plumbing.devices import HostRows, Runtime

# ----------------------------------------------------------------------------------------------------
# §1 Config
# ----------------------------------------------------------------------------------------------------


@dataclass
class R2MConfig:
    """Everything the training loop needs. Defaults are the paper's TL;DR settings (SPEC §5)."""

    # --- what to run -------------------------------------------------------------------------------
    algo: str = field(
        default="rloo",
        metadata={"help": "Advantage estimator: 'rloo' (Eq. 1), 'grpo', 'remax' (greedy-response baseline) or "
                  "'reinforce_pp' (REINFORCE++: KL in the per-token reward, batch-normalised returns)."},
    )
    reward: str = field(
        default="r2m",
        metadata={
            "help": "Reward mode: 'vanilla' (frozen RM), 'r2m', 'r2m_frozen' (feedback path never trained), "
            "'r2m_noise' (h replaced by Gaussian noise), 'iterative_head' (GREBT on the score head only), "
            "'pretrained_rm' (RM body and head fine-tuned with BT before RL, then frozen), 'brme' (reward-robust "
            "ensemble). 'R2M w/o BT' / 'w/o GRE' are --alpha 1 / --alpha 0."
        },
    )
    # --- sizes -------------------------------------------------------------------------------------
    total_trajectories: int = field(
        default=1_000_000, metadata={"help": "Trajectories (query, response) in the whole run; sets T."}
    )
    queries_per_step: int = field(default=2048, metadata={"help": "n: prompts sampled per RL step."})
    group_size: int = field(default=4, metadata={"help": "K: responses sampled per prompt (>= 2)."})
    max_new_tokens: int = field(default=50, metadata={"help": "Longest response, in policy tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (no top-k / top-p)."})
    # --- policy optimisation (Eq. 2) ----------------------------------------------------------------
    policy_lr: float = field(default=3e-6, metadata={"help": "Policy AdamW learning rate (see --lr_schedule)."})
    lr_schedule: str = field(
        default="linear",
        metadata={"help": "Learning rates of policy and RM head over the T steps: 'linear' (decay to 0) or 'constant'."},
    )
    policy_epochs: int = field(default=2, metadata={"help": "k: passes over a step's trajectories."})
    # Choice (the paper is silent): 512 trajectories per optimiser step, i.e. 16 steps per epoch at n*K = 8192;
    # temperature 0.7, k = 2, ε = 0.2 and β = 0.05 likewise (SPEC §5).
    policy_minibatch_size: int = field(
        default=512, metadata={"help": "Trajectories per policy optimiser step (must divide n*K)."}
    )
    clip_eps: float = field(default=0.2, metadata={"help": "ε of the clipped ratio."})
    beta: float = field(default=0.05, metadata={"help": "β: weight of the per-token k3 KL to the reference."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip for policy and RM head."})
    missing_eos_penalty: Optional[float] = field(
        default=None,
        metadata={"help": "If set, a response without EOS gets this reward instead of the RM's (off by default)."},
    )
    # --- R2M (Eqs. 3-7) -------------------------------------------------------------------------------
    omega_floor: float = field(default=0.6, metadata={"help": "Ω: floor of the ω(t) schedule (Eq. 4)."})
    alpha: float = field(default=0.3, metadata={"help": "α: GRE weight in GREBT (Eq. 7); 0 = w/o GRE, 1 = w/o BT."})
    d_attn: int = field(default=2048, metadata={"help": "d: width of the cross-attention (Eq. 3)."})
    rm_lr: float = field(default=5e-7, metadata={"help": "AdamW learning rate of cross-attention + score head."})
    rm_minibatch_groups: int = field(default=32, metadata={"help": "Groups per GREBT optimiser step."})
    rm_epochs: int = field(
        default=1, metadata={"help": "GREBT passes over a step's groups (1 = the paper's single reward-model update)."}
    )
    grebt_pairs: str = field(
        default="fresh",
        metadata={"help": "Rewards that pick GREBT's (winner, loser) pair: 'fresh' (recomputed with the fresh h' of the "
                  "last policy epoch, the paper's reading) or 'annotated' (this step's annotation-time rewards)."},
    )
    # --- Pretrained RM baseline (paper §5, App. G.5) -----------------------------------------------------
    pretrain_rm_preference_file: Optional[str] = field(
        default=None, metadata={"help": "Pretrained RM: JSON-lines {prompt, chosen, rejected} to fine-tune the RM on."}
    )
    pretrain_rm_epochs: int = field(default=1, metadata={"help": "Pretrained RM: epochs over the preference pairs."})
    pretrain_rm_lr: float = field(default=1e-6, metadata={"help": "Pretrained RM: AdamW learning rate (App. G.5: 1e-6)."})
    pretrain_rm_batch_size: int = field(default=8, metadata={"help": "Pretrained RM: preference pairs per optimiser step."})
    # --- BRME (second paper) --------------------------------------------------------------------------
    brme_heads: int = field(default=5, metadata={"help": "BRME: number of Gaussian reward heads."})
    brme_lambda: float = field(default=0.4, metadata={"help": "BRME: λ in (1-λ)·r_nominal + λ·r_min."})
    brme_preference_file: Optional[str] = field(
        default=None, metadata={"help": "BRME: JSON-lines file of {prompt, chosen, rejected} to train the heads."}
    )
    brme_epochs: int = field(default=2, metadata={"help": "BRME: epochs over each head's bootstrap sample."})
    brme_lr: float = field(default=1e-4, metadata={"help": "BRME: learning rate of the heads."})
    brme_sigma_prior: float = field(
        default=0.01, metadata={"help": "BRME: weight γ of the γ·(log σ)² prior that pulls each head's σ toward 1."}
    )
    # --- memory / speed ------------------------------------------------------------------------------
    # Choice: 64. Pythia-2.8B's bf16 KV cache holds 32 layers x 2 x 2560 x 2 bytes = 328 KB per token; 64 x 562 tokens
    # is 11 GiB beside 41 GiB of weights and AdamW state: benchmarks/memory_plan.py predicts a 58 GiB peak on 80.
    generation_batch_size: int = field(default=64, metadata={"help": "Sequences generated at once."})
    forward_batch_size: int = field(
        default=32, metadata={"help": "Sequences per no-grad forward (old/ref log-probs, RM scoring)."}
    )
    micro_batch_size: int = field(default=8, metadata={"help": "Sequences per policy forward/backward."})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "bf16 frozen models (reference, RM body) and bf16 autocast for what trains, float32 master weights; "
                "the same on CPU and GPU. Default: on for CUDA, off for CPU."})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={
        "help": "Recompute the policy's activations in backward. Default: on for CUDA, off for CPU."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cuda', or 'cpu'."})
    # --- bookkeeping ---------------------------------------------------------------------------------
    seed: int = field(default=0, metadata={"help": "Seed for prompts order, sampling and init."})
    output_dir: str = field(default="runs/r2m", metadata={"help": "Where metrics.jsonl and checkpoint/ go."})
    save_every: int = field(
        default=20, metadata={"help": "Write a checkpoint every N steps and at the end; 0 = never (benchmarks)."}
    )
    sample_every: int = field(default=10, metadata={"help": "Print a few (prompt, response, reward) every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its newest complete checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Start over in an output_dir that holds a run (deletes it)."})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Stop after this many steps in a row with a non-finite reward, loss or gradient norm (updates skipped)."})
    merge_on_save: bool = field(
        default=False,
        metadata={"help": "LoRA only: checkpoints also hold policy/, the policy with its adapter merged (a full model)."},
    )

    @property
    def trajectories_per_step(self) -> int:
        return self.queries_per_step * self.group_size

    @property
    def total_steps(self) -> int:
        return self.total_trajectories // self.trajectories_per_step

    def validate(self) -> None:
        """Reject settings that cannot work, with a message that says what to change."""
        # Every flag's range first (the size arithmetic below divides by some), then how the flags fit together.
        flag_ranges.check_ranges(
            self, choices=dict(algo=ALGOS, reward=REWARD_MODES, grebt_pairs=("fresh", "annotated"),
                               lr_schedule=("linear", "constant")),
            at_least=dict(total_trajectories=1, queries_per_step=1, group_size=1, max_new_tokens=1, policy_epochs=1,
                          policy_minibatch_size=1, micro_batch_size=1, d_attn=1, rm_minibatch_groups=1, brme_heads=1,
                          brme_epochs=1, generation_batch_size=1, forward_batch_size=1, save_every=0, sample_every=0,
                          max_nonfinite_steps=1, rm_epochs=1, pretrain_rm_epochs=1, pretrain_rm_batch_size=1,
                          pretrain_rm_lr=0.0, policy_lr=0.0, rm_lr=0.0, brme_lr=0.0, clip_eps=0.0, beta=0.0,
                          brme_sigma_prior=0.0),
            more_than=dict(max_grad_norm=0.0, temperature=0.0),
            within=dict(alpha=(0.0, 1.0), omega_floor=(0.0, 1.0), brme_lambda=(0.0, 1.0)),
            finite_or_none=("missing_eos_penalty",),
        )
        if self.group_size < ALGOS[self.algo].min_group_size:
            raise ValueError(f"--group_size must be at least 2 for --algo {self.algo} (leave-one-out / group std), "
                             f"got {self.group_size}")
        if REWARD_MODES[self.reward].train and self.group_size < 2:
            raise ValueError(f"--reward {self.reward} trains on within-group pairs (GREBT): --group_size must be >= 2, "
                             f"got {self.group_size}")
        if REWARD_MODES[self.reward].pretrain and not self.pretrain_rm_preference_file:
            raise ValueError(f"--reward {self.reward} needs --pretrain_rm_preference_file (JSON lines: prompt, chosen, rejected)")
        if self.total_steps < 1:
            raise ValueError(f"--total_trajectories {self.total_trajectories} is less than one step of "
                             f"{self.trajectories_per_step} (= queries_per_step x group_size)")
        if self.trajectories_per_step % self.policy_minibatch_size:
            raise ValueError(f"--policy_minibatch_size {self.policy_minibatch_size} must divide n*K = {self.trajectories_per_step}")
        if self.policy_minibatch_size % self.micro_batch_size:
            raise ValueError(f"--micro_batch_size {self.micro_batch_size} must divide --policy_minibatch_size "
                             f"{self.policy_minibatch_size}")
        if self.resume and self.overwrite:
            raise ValueError("--resume true and --overwrite true exclude each other: continue the run, or replace it")


# ----------------------------------------------------------------------------------------------------
# §2 The formulas
# ----------------------------------------------------------------------------------------------------


def omega(t: int, total_steps: int, floor: float) -> float:
    """Weight of the RM's own reward-token embedding at step t (0-based) of T.
    Choice: t counts from 0, so the first step is scored by the pure semantic RM (ω = 1) and the schedule
    reaches its floor at the same step in either reading. The paper's Algorithm 1 counts t = 1..T; the two
    readings differ by one step of the cosine (at most ≈ 0.013 at T = 122)."""
    # Eq. 4: ω(t) = max(½·cos(π·t/T) + ½, Ω).  ω(0) = 1 (pure semantic RM), decays to the floor Ω.
    return max(0.5 * math.cos(math.pi * t / total_steps) + 0.5, floor)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(n, K) -> (n, K). Eq. 1: A_ij = r_ij - mean_{j' != j} r_ij'."""
    K = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)  # (n, K)
    return rewards - leave_one_out_mean


def _group_std(rewards: torch.Tensor, correction: int) -> torch.Tensor:
    """(n, K) -> (n, 1): the std of each group, dividing by K - correction. Clamped under the square root so
    that a zero-spread group has a finite gradient."""
    var = rewards.var(dim=1, keepdim=True, correction=correction)  # (n, 1)
    return var.clamp_min(1e-24).sqrt()


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(n, K) -> (n, K). GRPO: A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps).
    Choice: the unbiased sample std (divide by K - 1), as DeepSeekMath's GRPO is implemented in TRL and
    OpenRLHF (torch's default `std`); the R2M paper takes GRPO as given and does not restate it."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (_group_std(rewards, correction=1) + eps)


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """(n, K), (n,) -> (n, K). ReMax (Li et al., 2023): A_ij = r_ij - r(x_i, ŷ_i), the baseline being the
    reward of the policy's greedy response ŷ_i to the same prompt; every sample of a group shares it."""
    return rewards - greedy_rewards[:, None]


def reinforce_pp_advantages(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, eps: float = 1e-8
) -> torch.Tensor:
    """(N,), (N, R), (N, R) -> (N, R). REINFORCE++ (Hu, 2025), no critic: per-token rewards
    r_t = -β·KL_t, plus the RM's score on the last response token; the return G_t = Σ_{t' >= t} r_t' (γ = 1);
    advantages are the returns normalised over every response token of the whole batch (not per group).
    kl: a per-token KL estimate of π_old against π_ref; mask: 1 on response tokens up to and including EOS."""
    mask = mask.float()
    token_rewards = -beta * kl * mask  # (N, R)
    last = (mask.sum(dim=1) - 1).clamp_min(0).long()  # (N,) index of the last response token
    token_rewards[torch.arange(len(rewards)), last] += rewards
    returns = token_rewards.flip(1).cumsum(dim=1).flip(1)  # (N, R): G_t, the sum of future rewards
    valid = returns[mask.bool()]
    return (returns - valid.mean()) / (valid.std() + eps) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict]:
    """Eq. 2, negated for gradient descent.

    logprobs, old_logprobs, ref_logprobs: (B, T) log-probs of the sampled response tokens under π_θ,
    π_old and π_ref; advantages: (B,) one per response, or (B, T) one per token (REINFORCE++);
    mask: (B, T), 1 on response tokens up to and including EOS.
    """
    mask = mask.bool()
    # Eq. 2: ρ = π_θ / π_old; surrogate = min(ρ·A, clip(ρ, 1-ε, 1+ε)·A).
    # Choice: ρ per token, as PPO / GRPO implementations do (TRL, OpenRLHF). The paper writes Eq. 2 with the
    # sequence-level ratio π_θ(y|x) / π_old(y|x); a product of 50-500 token ratios is clipped almost always.
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) for every token, or (B, T)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    # Eq. 2: per-token KL(π_θ || π_ref) by the k3 estimator exp(q - p) - (q - p) - 1, p = log π_θ, q = log π_ref
    log_ratio_ref = ref_logprobs - logprobs  # (B, T), q - p
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # (B, T), >= 0
    per_token = -(surrogate - beta * kl)  # (B, T): we minimise the negative objective
    # Choice: mean over response tokens per sequence, then mean over sequences (SPEC §1).
    # Masked with `where`, not a product: a padded position may hold an overflowing ratio, and inf·0 = NaN.
    lengths = mask.sum(dim=1).clamp_min(1)  # (B,)
    masked_mean = lambda x: (torch.where(mask, x, 0.0).sum(dim=1) / lengths)  # noqa: E731  (B, T) -> (B,)
    loss = masked_mean(per_token).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {
            "policy/loss": loss.item(),
            "policy/kl_k3": masked_mean(kl).mean().item(),
            "policy/clipfrac": masked_mean(clipped).mean().item(),
            "policy/ratio": masked_mean(ratio).mean().item(),
        }
    return loss, stats


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> (). Eq. 5: L_BT = -log σ(r_w - r_l), mean over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def group_reward_entropy(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n, K) -> (). Eq. 6, mean over groups.

    z = (r - mean(r)) / (std(r) + eps), p = softmax(z), L_GRE = -Σ_j p_j log p_j, with std the population
    std (divide by K), as the paper's Appendix A defines it (Definitions A.9-A.10).
    Choice: gradients flow through the mean and the std, as the equation is written.
    """
    K = rewards.shape[1]
    # Eq. 6: standardise within the group (population std, App. A), then the entropy of the softmax over it
    z = (rewards - rewards.mean(dim=1, keepdim=True)) / (_group_std(rewards, correction=0) + eps)  # (n, K)
    log_p = F.log_softmax(z, dim=1)  # (n, K)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # (n,)
    # A group whose K rewards are all equal sits at the entropy maximum log K, where the gradient is zero.
    # Rounding in mean/std would turn that zero into noise amplified by 1/eps, so we pin such groups to the
    # constant log K: their gradient is exactly zero (SPEC §3).
    degenerate = (rewards == rewards[:, :1]).all(dim=1)  # (n,)
    entropy = torch.where(degenerate, torch.full_like(entropy, math.log(K)), entropy)
    return entropy.mean()


def grebt_pair(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) -> winner (n, 1), loser (n, 1): the self-labelled preference pair of each group, the response
    with the highest and the one with the lowest reward (no gradient flows through the choice)."""
    return rewards.argmax(dim=1, keepdim=True), rewards.argmin(dim=1, keepdim=True)


def grebt_loss(new_rewards: torch.Tensor, pair_rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """(n, K), (n, K) -> (). Eq. 7: L_GREBT = (1 - α)·L_BT + α·L_GRE, averaged over groups.

    The pair (winner = argmax, loser = argmin) is chosen by `pair_rewards`; both loss terms are computed on
    `new_rewards`, recomputed with the current score head and the fresh hidden states of the last policy
    epoch. Which rewards choose the pair is `--grebt_pairs` (see `reward_model_update`)."""
    winner, loser = grebt_pair(pair_rewards.detach())  # (n, 1) each
    r_w = new_rewards.gather(1, winner).squeeze(1)  # (n,)
    r_l = new_rewards.gather(1, loser).squeeze(1)  # (n,)
    # Eq. 7
    return (1 - alpha) * bradley_terry_loss(r_w, r_l) + alpha * group_reward_entropy(new_rewards)


# ----------------------------------------------------------------------------------------------------
# §3 The reward model: hidden-state capture, cross-attention, R2M reward model, reward modes
# ----------------------------------------------------------------------------------------------------


class HiddenStateCapture:
    """Records the policy's last-layer hidden states during a forward pass the loop makes anyway.

    The input of `policy.get_output_embeddings()` (the LM head) is the last hidden state after the final
    norm, for any Hugging Face causal LM, so a forward hook there costs no extra pass.

        with HiddenStateCapture(policy) as cap:
            logits = policy(input_ids).logits
        cap.hidden  # (B, S, D_p), detached
    """

    def __init__(self, policy: nn.Module, enabled: bool = True):
        self.policy, self.enabled = policy, enabled
        self.hidden: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.hidden = inputs[0].detach()  # (B, S, D_p)

    def pop(self) -> torch.Tensor:
        """(B, S, D_p): the captured states, dropping our reference. Under autocast they are a float32 copy
        of the final norm's output that nothing else keeps, so holding them through the next forward or a
        backward would keep a (B, S, D_p) float32 tensor alive on the GPU for nothing."""
        hidden, self.hidden = self.hidden, None
        return hidden

    def __enter__(self) -> "HiddenStateCapture":
        if self.enabled:
            self._handle = self.policy.get_output_embeddings().register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class GenerationStateCapture(HiddenStateCapture):
    """The same last-layer states, captured during `generate()` (ReMax's greedy baseline needs h for responses
    it never runs a forward on). With a KV cache the prefill sees positions 0..P-1 and each decoding step one
    more position, and transformers then hands the LM head only the last position (`logits_to_keep`), so the
    hook sits on the backbone's output (its `last_hidden_state`, after the final norm: the LM head's input)
    and concatenates each generate() call's pieces into its rows of `hidden`, a `HostRows` (N, P + R - 1, D_p):
    the positions whose outputs predicted a token, as `HiddenStateCapture` gives with [:, :-1]."""

    def __init__(self, policy: nn.Module, hidden: HostRows):
        super().__init__(policy)
        self.hidden = hidden
        self._pieces: list[torch.Tensor] = []

    def _hook(self, module, inputs, output):
        self._pieces.append(output[0].detach())  # (b, s, D_p): s = P at prefill, then 1 per decoding step

    def __enter__(self) -> "GenerationStateCapture":
        self._handle = self.policy.base_model.register_forward_hook(self._hook)
        return self

    def end_batch(self, rows: torch.Tensor) -> None:
        """Close one generate() call whose sequences are rows `rows` (b,) of `hidden`: its states (b, P + R' - 1,
        D_p), zero-padded to the rows' length when generation stopped early."""
        length = self.hidden.row_shape[0]
        states = torch.cat(self._pieces, dim=1)[:, :length]
        self._pieces = []
        self.hidden.scatter(rows, F.pad(states, (0, 0, 0, length - states.shape[1])))


class PolicyFeedbackAttention(nn.Module):
    """Eq. 3: sequence-to-token cross-attention from the RM's reward-token embedding to the policy's states.

    One query from the RM, keys/values from the policy, so the policy and the RM may be different models
    (different hidden sizes, tokenizers): nothing aligns the two sequences token by token.
    Choice: single head and no biases (the equation is single-head and bias-free); PyTorch's default
    Linear init (the paper reports that the untrained module hurts, which a zero init would hide).
    """

    def __init__(self, d_rm: int, d_policy: int, d_attn: int):
        super().__init__()
        self.d_attn = d_attn
        self.W_q = nn.Linear(d_rm, d_attn, bias=False)
        self.W_k = nn.Linear(d_policy, d_attn, bias=False)
        self.W_v = nn.Linear(d_policy, d_attn, bias=False)
        self.W_o = nn.Linear(d_attn, d_rm, bias=False)

    def forward(self, rte: torch.Tensor, h: torch.Tensor, h_mask: torch.Tensor) -> torch.Tensor:
        """rte (B, D_rm), h (B, S, D_p), h_mask (B, S) bool (True = real position) -> (B, D_rm)."""
        h = h.to(self.W_k.weight.dtype)
        # Eq. 3: q = H_last W_q, k = h W_k, v = h W_v, Ĥ = softmax(q kᵀ / sqrt(d)) v W_o
        q = self.W_q(rte.to(self.W_q.weight.dtype))  # (B, d)
        k = self.W_k(h)  # (B, S, d)
        v = self.W_v(h)  # (B, S, d)
        scores = torch.einsum("bd,bsd->bs", q, k) / math.sqrt(self.d_attn)  # (B, S)
        # Padding and post-EOS positions carry no information about the response: they get zero weight.
        scores = scores.masked_fill(~h_mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # (B, S)
        attended = torch.einsum("bs,bsd->bd", weights, v)  # (B, d)
        return self.W_o(attended)  # (B, D_rm)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S). With left padding the first real token must get position 0, as generate() does;
    a plain forward would number from the first pad instead and see a shifted sequence."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B,): index of the last real token, whatever the padding side.
    Choice: found from the attention mask, not from pad-token ids, so an EOS that doubles as the pad token
    still counts as a real token when it ends a response."""
    S = attention_mask.shape[1]
    positions = torch.arange(S, device=attention_mask.device)  # (S,)
    return (positions * attention_mask.long()).argmax(dim=1)


class FrozenRewardBody(nn.Module):
    """A pretrained scalar RM (any Hugging Face `*ForSequenceClassification` with one label and a `score`
    head) whose LLM body stays frozen. Subclasses put trainable heads on its reward-token embedding."""

    def __init__(self, reward_model: nn.Module):
        super().__init__()
        if not isinstance(getattr(reward_model, "score", None), nn.Linear) or reward_model.score.out_features != 1:
            raise ValueError(
                f"{type(reward_model).__name__} is not a scalar *ForSequenceClassification reward model "
                "(expected a `score` Linear head with one output)"
            )
        reward_model.requires_grad_(False)
        self.reward_model = reward_model

    def reward_token_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """(B, S), (B, S) -> (B, D_rm): H_last, the body's last hidden state at the last real token.
        Without gradients unless `grad` (only the whole-RM cost baseline trains the body)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._reward_token_embedding(input_ids, attention_mask)

    def _reward_token_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        body = self.reward_model.base_model
        hidden = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, S, D_rm)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]  # (B, D_rm)

    def forward(self, input_ids, attention_mask, h=None, h_mask=None, omega: float = 1.0) -> torch.Tensor:
        """(B, S), (B, S), (B, S_p, D_p), (B, S_p), ω -> (B,) rewards."""
        rte = self.reward_token_embedding(input_ids, attention_mask)
        return self.rewards_from_embedding(rte, h, h_mask, omega)

    def reward_parts(self, rte, h=None, h_mask=None, omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D_rm) -> (rewards (B,), the part of them that comes from policy feedback (B,)): none here."""
        rewards = self.rewards_from_embedding(rte, h, h_mask, omega)
        return rewards, torch.zeros_like(rewards)


class R2MRewardModel(FrozenRewardBody):
    """r_φ(x, y, h): a pretrained scalar RM whose body is frozen, plus the policy-feedback path.

    Trainable: the cross-attention (W_q, W_k, W_v, W_o) and the score head φ, which is a float32 copy of the
    RM's own head, so at ω = 1 R2M gives exactly the RM's own reward. The wrapped RM is never modified.
    """

    def __init__(self, reward_model: nn.Module, d_policy: int, d_attn: int = 2048, seed: int = 0):
        super().__init__(reward_model)
        d_rm = reward_model.score.in_features
        # Choice: the cross-attention's initial weights are a function of `seed` alone, drawn from a private
        # generator state, so they do not depend on what else the process drew before (other runs, data).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy_feedback = PolicyFeedbackAttention(d_rm, d_policy, d_attn).float()
            self.score_head = nn.Linear(d_rm, 1, bias=reward_model.score.bias is not None).float()
        self.score_head.load_state_dict({k: v.float() for k, v in reward_model.score.state_dict().items()})

    def trainable_parameters(self, feedback: bool = True, body: bool = False) -> Iterator[nn.Parameter]:
        """The cross-attention (unless feedback=False) and the score head; the RM body only for the
        whole-RM cost baseline (body=True)."""
        if feedback:
            yield from self.policy_feedback.parameters()
        yield from self.score_head.parameters()
        if body:
            yield from self.reward_model.base_model.parameters()

    save_body = False  # set when the body itself was trained (the Pretrained RM baseline)

    def trainable_state_dict(self) -> dict:
        """What a checkpoint keeps of the reward model. With a trained body (whole-RM / Pretrained-RM baselines) it
        includes the body's full weights: under torchrun a collective, so every process calls this."""
        state = {"policy_feedback": self.policy_feedback.state_dict(), "score_head": self.score_head.state_dict()}
        if self.save_body or any(p.requires_grad for p in self.reward_model.base_model.parameters()):
            # --- distributed: a sharded body is gathered whole (onto rank 0's host memory) ---
            state["body"] = distributed.full_state_dict(self.reward_model.base_model)
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        self.policy_feedback.load_state_dict(state["policy_feedback"])
        self.score_head.load_state_dict(state["score_head"])
        if "body" in state:
            self.save_body = True  # a resumed Pretrained-RM run keeps its fine-tuned body in later checkpoints
            # --- distributed: rank 0's full copy, each process keeping its own shard ---
            distributed.load_full_state_dict(self.reward_model.base_model, state["body"])

    def fit_before_rl(self, chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor],
                      cfg: "R2MConfig", rt: Runtime) -> str:
        """The Pretrained-RM baseline's fine-tuning on preference pairs (`pretrain_reward_model`); one line to print."""
        before, after = pretrain_reward_model(self, chosen, rejected, cfg, rt)
        return (f"Pretrained RM: BT fine-tuning of the whole RM on {len(chosen[0])} pairs, {cfg.pretrain_rm_epochs} "
                f"epoch(s) at lr {cfg.pretrain_rm_lr:g}: pair accuracy {before:.3f} -> {after:.3f}")

    def reward_parts(
        self, rte: torch.Tensor, h: Optional[torch.Tensor] = None, h_mask: Optional[torch.Tensor] = None,
        omega: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rte (B, D_rm), h (B, S, D_p) or None, h_mask (B, S) -> (reward (B,), feedback part (B,)).

        φ is linear, so the reward splits along Eq. 4: φ(H_fin) = (1 - ω)·w·Ĥ + ω·w·H_last + b, where the
        first term is what the policy-feedback path contributes (zero without feedback or at ω = 1)."""
        with devices.float32_only(rte):
            rte = rte.float()
            if h is None or omega == 1.0:
                # no feedback (vanilla / iterative head), or ω = 1: H_fin = H_last exactly
                return self.score_head(rte).squeeze(-1), torch.zeros(rte.shape[0], device=rte.device)
            feedback = self.policy_feedback(rte, h, h_mask)  # (B, D_rm), Ĥ
            # Eq. 4: H_fin = (1 - ω(t))·Ĥ + ω(t)·H_last, reward = φ(H_fin)
            final = (1 - omega) * feedback + omega * rte
            feedback_part = (1 - omega) * (feedback @ self.score_head.weight[0])  # (B,)
            return self.score_head(final).squeeze(-1), feedback_part

    def rewards_from_embedding(
        self, rte: torch.Tensor, h: Optional[torch.Tensor] = None, h_mask: Optional[torch.Tensor] = None,
        omega: float = 1.0,
    ) -> torch.Tensor:
        """rte (B, D_rm), h (B, S, D_p) or None, h_mask (B, S) -> (B,) rewards φ(H_fin), in float32."""
        return self.reward_parts(rte, h, h_mask, omega)[0]


def pretrain_reward_model(
    reward_model: R2MRewardModel, chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor],
    cfg: R2MConfig, rt: Runtime,
) -> tuple[float, float]:
    """The "Pretrained RM" baseline (paper §5, App. G.5): before RL, fine-tune the whole RM (body and score
    head φ) with the Bradley-Terry loss (Eq. 5) on preference pairs of the prompts the policy trains on;
    RL then runs with it frozen (reward mode `pretrained_rm`, no policy feedback).
    chosen, rejected: (ids (M, S), mask (M, S)) the RM's view of each pair's two responses, right-padded.
    Returns the RM's accuracy on these pairs (r_chosen > r_rejected) before and after.
    Choice: AdamW without weight decay at --pretrain_rm_lr (App. G.5: 1e-6), --pretrain_rm_epochs passes in
    shuffled minibatches of exactly --pretrain_rm_batch_size pairs (the few left over by an epoch's shuffle wait
    for the next one, so N processes can split every minibatch evenly), float32 master weights under the run's
    autocast, gradient-norm clip as the loop's."""
    body = reward_model.reward_model.base_model
    # --- distributed: under torchrun the body is FSDP-sharded (float32 shards, bf16 compute with --bf16) and each
    # process takes its share of every minibatch; on one process it is moved whole and fine-tuned in float32 ---
    rank, world_size = distributed.rank_and_world_size()
    sharded = distributed.is_sharded(body)
    if not sharded:
        reward_model.to(rt.device)
        devices.cast_parameters(reward_model.reward_model, torch.float32)
    M, B = chosen[0].shape[0], cfg.pretrain_rm_batch_size
    if M < B:
        raise TrainingError(f"the preference file holds {M} pairs, fewer than --pretrain_rm_batch_size {B}")
    body.train().requires_grad_(True)  # dropout was switched off at start-up; train mode only for what the model does
    if rt.gradient_checkpointing:  # activations of the RM's forward/backward recomputed in backward, as the policy's
        devices.checkpoint_activations(reward_model.reward_model)
    params = list(body.parameters()) + list(reward_model.score_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.pretrain_rm_lr, weight_decay=0.0, fused=rt.device.type == "cuda")

    def rewards(pair: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:  # (b,)
        L = int(pair[1][rows].sum(1).max())  # right-padded: the batch is cut to its own longest row
        ids, mask = pair[0][rows, :L].to(rt.device), pair[1][rows, :L].to(rt.device)
        with rt.autocast():
            return reward_model.rewards_from_embedding(reward_model.reward_token_embedding(ids, mask, grad=True))

    @torch.no_grad()
    def accuracy() -> float:
        share = M // world_size  # every process scores as many pairs (under FSDP: as many forwards)
        mine = torch.arange(rank * share, (rank + 1) * share)
        wins = sum(int((rewards(chosen, rows) > rewards(rejected, rows)).sum()) for rows in mine.split(cfg.forward_batch_size))
        return distributed.sum_over_ranks(wins) / (share * world_size)

    before = accuracy()
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.pretrain_rm_epochs):
        order = torch.randperm(M, generator=g)
        for k in range(M // B):
            rows = order[k * B : (k + 1) * B].chunk(world_size)[rank]  # this process's share of the minibatch
            loss = bradley_terry_loss(rewards(chosen, rows), rewards(rejected, rows))  # Eq. 5
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(reward_model.score_head.parameters())  # --- distributed: replicated head ---
            distributed.clip_grad_norm(params, cfg.max_grad_norm)
            optimizer.step()
    # Choice: the optimiser and every gradient go before RL starts: kept, they would sit in GPU memory through the
    # whole run (an RM's worth of float32 gradients, 10.4 GiB at 2.8B).
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    body.eval().requires_grad_(False)
    if rt.gradient_checkpointing:
        devices.checkpoint_activations(reward_model.reward_model, enabled=False)
    after = accuracy()
    if not sharded:  # stored like the other frozen models from now on (a sharded one computes in bf16 anyway)
        devices.cast_parameters(reward_model.reward_model, rt.frozen_dtype)
    reward_model.save_body = True  # the fine-tuned body is part of this run's state: checkpoints keep it
    return before, after


@dataclass(frozen=True)
class RewardMode:
    """How a reward mode uses the reward model. Chosen once, in `REWARD_MODES`; the loop never branches
    on the mode's name."""

    feedback: bool  # pass the policy's hidden states through the cross-attention (Eqs. 3-4)
    noise: bool  # replace h by Gaussian noise with h's mean and variance (ablation)
    train: bool  # run the GREBT reward-model step after every policy step (Eqs. 5-7)
    ensemble: bool = False  # BRME: reward-robust ensemble instead of R2M (SPEC §6)
    train_body: bool = False  # also train the RM's whole LLM body (the costly alternative R2M avoids)
    annotated_pairs: bool = False  # GREBT pairs from the annotation-time rewards whatever --grebt_pairs says
    pretrain: bool = False  # before RL, fine-tune the whole RM with Bradley-Terry on preference pairs (then frozen)


# The R2M paper's baselines and ablations (SPEC §4) and BRME. w/o BT / w/o GRE are alpha = 1 / 0.
REWARD_MODES: dict[str, RewardMode] = {
    "vanilla": RewardMode(feedback=False, noise=False, train=False),
    "r2m": RewardMode(feedback=True, noise=False, train=True),
    "r2m_frozen": RewardMode(feedback=True, noise=False, train=False),
    "r2m_noise": RewardMode(feedback=True, noise=True, train=True),
    "iterative_head": RewardMode(feedback=False, noise=False, train=True, annotated_pairs=True),  # App. G.5
    "pretrained_rm": RewardMode(feedback=False, noise=False, train=False, pretrain=True),  # App. G.5
    "brme": RewardMode(feedback=False, noise=False, train=False, ensemble=True),
    # Not a method of the paper but its cost baseline: R2M with every RM parameter trainable, so the GREBT step
    # must run the RM body with gradients instead of reusing the cached H_last.
    "r2m_full_rm": RewardMode(feedback=True, noise=False, train=True, train_body=True),
}


def gaussian_like(h: torch.Tensor, h_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, D), (B, S) -> (B, S, D): noise with h's mean and variance.
    Choice: per sequence and per feature, over the sequence's real positions."""
    m = h_mask[..., None].to(h.dtype)  # (B, S, 1)
    count = m.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    mean = (h * m).sum(dim=1, keepdim=True) / count  # (B, 1, D)
    std = (((h - mean) ** 2 * m).sum(dim=1, keepdim=True) / count).sqrt()  # (B, 1, D)
    return mean + std * torch.randn_like(h)


# ----------------------------------------------------------------------------------------------------
# §4 One training step
# ----------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One step's trajectories (N = n·K, group j of prompt i at row i·K + j)."""

    query_responses: torch.Tensor  # (N, P + R) policy tokens: prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (N, P + R) 1 on real tokens (prompt, and response up to EOS)
    response_mask: torch.Tensor  # (N, R) 1 on response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (N, R) log π_old of the sampled tokens (temperature-scaled)
    ref_logprobs: torch.Tensor  # (N, R) log π_ref of the same tokens
    hidden: Optional[HostRows]  # (N, P + R - 1, D_p) policy last-layer states, in host memory (`devices.HostRows`);
    # None when the reward mode uses no policy feedback
    hidden_mask: torch.Tensor  # (N, P + R - 1) bool, positions whose output predicts a real next token
    rm_input_ids: torch.Tensor  # (N, S_rm) the RM's view of prompt + response, right-padded
    rm_attention_mask: torch.Tensor  # (N, S_rm)
    contains_eos: torch.Tensor  # (N,) bool
    prompt_len: int  # P
    reward_token_embedding: Optional[torch.Tensor] = None  # (N, D_rm), filled by annotate_rewards
    feedback_reward: Optional[torch.Tensor] = None  # (N,) the policy-feedback part of each reward, likewise


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """responses (B, R) -> (responses with pad after the first EOS, mask (B, R) 1 up to and including EOS)."""
    R = responses.shape[1]
    is_eos = responses == eos_id  # (B, R)
    # index of the first EOS, or R when there is none
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full_like(is_eos[:, 0], R, dtype=torch.long))
    mask = torch.arange(R, device=responses.device)[None, :] <= first_eos[:, None]  # (B, R)
    return responses.masked_fill(~mask, pad_id), mask.long()


def sequence_logprobs(
    model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float
) -> torch.Tensor:
    """(B, P+R) -> (B, R): log-probabilities of the response tokens under `model` at `temperature`."""
    logits = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits  # (B, P+R, V)
    # Logits at position s predict token s+1: the response tokens P..P+R-1 are predicted by P-1..P+R-2.
    logits = logits[:, prompt_len - 1 : -1]  # (B, R, V), still in the forward's dtype (bf16 under autocast)
    targets = query_responses[:, prompt_len:]  # (B, R)
    # Choice: log p(tok) = logit_tok - logsumexp(logits), in float32, a few positions at a time, instead of one
    # float32 log-softmax over every position's whole vocabulary (8 x 512 x 151,936 floats = 2.5 GB for Qwen,
    # and as much again for its gradient). Same numbers within float rounding. With gradients each chunk is
    # recomputed in backward (checkpoint), so only the bf16 logits are kept, never the float32 copies.
    chunk = max(1, LOGPROB_CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[2]))  # positions per chunk
    pieces = [
        torch.utils.checkpoint.checkpoint(_token_logprobs, lg, tg, temperature, use_reentrant=False)
        if torch.is_grad_enabled() else _token_logprobs(lg, tg, temperature)
        for lg, tg in zip(logits.split(chunk, dim=1), targets.split(chunk, dim=1))
    ]
    return torch.cat(pieces, dim=1)  # (B, R)


LOGPROB_CHUNK_ELEMENTS = 2**27  # float32 logits per chunk in sequence_logprobs: 512 MiB


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, c, V), (B, c) -> (B, c): log-softmax of the temperature-scaled logits at the target tokens.
    Divide by the sampling temperature: these must be log-probs of the distribution we sampled from."""
    logits = logits.float() / temperature  # (B, c, V)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)


def hidden_state_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S-1) bool: position s is kept when tokens s and s+1 are both real, i.e. its output
    predicts a real next token (SPEC §1: S_ij - 1 positions; padding and post-EOS positions are dropped)."""
    return (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()


@torch.no_grad()
def policy_hidden_states(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(B, S), (B, S) -> h (B, S-1, D_p), h_mask (B, S-1): the policy's feedback for sequences it did not
    just sample (evaluation, analysis). The training loop needs no such pass: it captures h during the
    log-prob forwards it makes anyway."""
    with HiddenStateCapture(policy) as cap:
        policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return cap.hidden[:, :-1], hidden_state_mask(attention_mask)


def generate_responses(
    policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, tokenizer, cfg: R2MConfig, rt: Runtime,
    greedy: bool = False, capture: Optional[GenerationStateCapture] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query_ids, query_mask (N, P) left-padded -> response ids (N, R) padded after the first EOS, and the
    response mask (N, R), 1 up to and including EOS. Batches of --generation_batch_size."""
    from transformers import GenerationConfig

    R, P = cfg.max_new_tokens, query_ids.shape[1]
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    # Temperature sampling and nothing else (top_k=0 switches off transformers' default top-k of 50), and
    # nothing from the model's own generation_config.json (see `own_generation_config`), so the log-probs
    # computed afterwards are those of the distribution sampled. ReMax's baseline decodes greedily instead.
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    gen_config = GenerationConfig(**sampling, max_new_tokens=R, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True)
    responses = []
    for s in range(0, len(query_ids), cfg.generation_batch_size):
        ids = query_ids[s : s + cfg.generation_batch_size].to(rt.device)
        mask = query_mask[s : s + cfg.generation_batch_size].to(rt.device)
        # --- distributed: gather a sharded policy once per generate() call, not once per token ---
        with rt.autocast(), distributed.gathered_for_generation(policy), devices.generation_weights(policy, rt.autocast_dtype), \
                devices.own_generation_config(policy), (capture or contextlib.nullcontext()):
            out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        resp = out[:, P:]  # (b, R') with R' <= R: generation stops once every row has hit EOS
        resp = F.pad(resp, (0, R - resp.shape[1]), value=pad_id)  # (b, R)
        responses.append(resp.cpu())
        if capture is not None:
            capture.end_batch(torch.arange(s, s + len(ids)))
    return truncate_after_eos(torch.cat(responses), eos_id, pad_id)  # (N, R) each


@torch.no_grad()
def rollout(
    policy: nn.Module,
    ref_policy: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    prompt_texts: Optional[list[str]],
    cfg: R2MConfig,
    rt: Runtime,
    rm_view: Optional[RMView],
    rm_pad_id: int,
    capture_hidden: bool = True,
) -> Rollout:
    """1. Trajectory sampling: K responses per prompt from π_old = π_θ, with old and reference log-probs
    and the policy's last-layer hidden states captured during the old-log-prob forward (no extra pass).
    capture_hidden=False (reward modes without policy feedback) skips capturing and storing them."""
    K = cfg.group_size
    policy.eval()
    # Every prompt is repeated K times, so group i occupies rows i*K .. i*K+K-1.
    queries = [p for p in prompts for _ in range(K)]
    query_ids, query_mask = pad_left(queries, pad_token_id(tokenizer))  # (N, P)
    P = query_ids.shape[1]
    response_ids, response_mask = generate_responses(policy, query_ids, query_mask, tokenizer, cfg, rt)  # (N, R)
    query_responses = torch.cat([query_ids, response_ids], dim=1)  # (N, P+R)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (N, P+R)
    contains_eos = (response_ids == tokenizer.eos_token_id).any(dim=1) & (response_mask.sum(1) > 0)

    # Old and reference log-probs. The policy's forward here also yields its hidden states via the hook; they go
    # to host memory, one row per trajectory (the last position predicts nothing: P+R-1 positions).
    hidden = HostRows.for_policy(len(queries), query_responses.shape[1] - 1, policy, rt) if capture_hidden else None
    old, ref = [], []
    for s in range(0, len(queries), cfg.forward_batch_size):
        qr = query_responses[s : s + cfg.forward_batch_size].to(rt.device)
        am = attention_mask[s : s + cfg.forward_batch_size].to(rt.device)
        with rt.autocast(), HiddenStateCapture(policy, enabled=capture_hidden) as cap:
            old.append(sequence_logprobs(policy, qr, am, P, cfg.temperature).cpu())
        if capture_hidden:
            hidden.scatter(torch.arange(s, s + len(qr)), cap.pop()[:, :-1])  # (b, P+R-1, D_p)
        with rt.autocast():
            ref.append(sequence_logprobs(ref_policy, qr, am, P, cfg.temperature).cpu())
    if capture_hidden:
        hidden.synchronize()

    row_texts = [prompt_texts[i // K] for i in range(len(queries))] if prompt_texts is not None else None
    rm_ids, rm_mask = rm_inputs(tokenizer, query_responses, attention_mask, response_ids, response_mask, row_texts,
                                rm_view, rm_pad_id)
    return Rollout(
        query_responses=query_responses,
        attention_mask=attention_mask,
        response_mask=response_mask,
        old_logprobs=torch.cat(old),
        ref_logprobs=torch.cat(ref),
        hidden=hidden,
        hidden_mask=hidden_state_mask(attention_mask),
        rm_input_ids=rm_ids,
        rm_attention_mask=rm_mask,
        contains_eos=contains_eos,
        prompt_len=P,
    )


@torch.no_grad()
def greedy_baseline(
    policy: nn.Module, reward_model, tokenizer, prompts: list[list[int]], prompt_texts: Optional[list[str]],
    omega_t: float, mode: RewardMode, cfg: R2MConfig, rt: Runtime, rm_view: Optional[RMView], rm_pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax's baseline (Li et al., 2023): the reward of the policy's greedy response to each prompt -> (n,)
    rewards and (n,) contains-EOS. Part of the rollout phase: one greedy generation and one RM score per
    prompt, scored exactly like the sampled responses (same reward mode, same ω(t)). With policy feedback,
    h is captured during the greedy generation itself, so no policy forward is added."""
    policy.eval()
    query_ids, query_mask = pad_left(prompts, pad_token_id(tokenizer))  # (n, P)
    positions = query_ids.shape[1] + cfg.max_new_tokens - 1
    capture = GenerationStateCapture(policy, HostRows.for_policy(len(prompts), positions, policy, rt)) if mode.feedback else None
    response_ids, response_mask = generate_responses(policy, query_ids, query_mask, tokenizer, cfg, rt,
                                                     greedy=True, capture=capture)  # (n, R)
    query_responses = torch.cat([query_ids, response_ids], dim=1)  # (n, P+R)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    rm_ids, rm_mask = rm_inputs(tokenizer, query_responses, attention_mask, response_ids, response_mask,
                                prompt_texts, rm_view, rm_pad_id)
    greedy = Rollout(
        query_responses=query_responses, attention_mask=attention_mask, response_mask=response_mask,
        old_logprobs=None, ref_logprobs=None,  # a baseline is scored, never trained on
        hidden=capture.hidden if capture is not None else None,
        hidden_mask=hidden_state_mask(attention_mask), rm_input_ids=rm_ids, rm_attention_mask=rm_mask,
        contains_eos=(response_ids == tokenizer.eos_token_id).any(dim=1), prompt_len=query_ids.shape[1],
    )
    return annotate_rewards(reward_model, greedy, omega_t, mode, cfg, rt), greedy.contains_eos


def _feedback_states(ro: Rollout, idx: torch.Tensor, mode: RewardMode, rt: Runtime):
    """The h and h_mask the reward model sees for rows `idx`, per the reward mode (None: no feedback)."""
    if not mode.feedback:
        return None, None
    h = ro.hidden.gather(idx, rt.device)  # (b, P+R-1, D_p)
    h_mask = ro.hidden_mask[idx].to(rt.device)  # (b, P+R-1)
    if mode.noise:
        h = gaussian_like(h.float(), h_mask)
    return h, h_mask


@torch.no_grad()
def annotate_rewards(reward_model, ro: Rollout, omega_t: float, mode: RewardMode, cfg: R2MConfig, rt: Runtime) -> torch.Tensor:
    """2. Reward annotation: r_ij = r_φ(x_i, y_ij, h_ij) -> (N,) on CPU.

    Choice: the RM body is frozen, so each sample's reward-token embedding H_last is computed here once
    and kept (N, D_rm) for the GREBT step, which then needs no RM forward at all."""
    rewards, feedback_parts, rtes = [], [], []
    N = ro.rm_input_ids.shape[0]
    for s in range(0, N, cfg.forward_batch_size):
        idx = torch.arange(s, min(s + cfg.forward_batch_size, N))
        with rt.autocast():
            rte = reward_model.reward_token_embedding(
                ro.rm_input_ids[idx].to(rt.device), ro.rm_attention_mask[idx].to(rt.device)
            )  # (b, D_rm)
            h, h_mask = _feedback_states(ro, idx, mode, rt)
            r, feedback_part = reward_model.reward_parts(rte, h, h_mask, omega_t)  # (b,), (b,)
        rewards.append(r.float().cpu())
        feedback_parts.append(feedback_part.float().cpu())
        rtes.append(rte.float())
    ro.reward_token_embedding = torch.cat(rtes)  # (N, D_rm), stays on the compute device: it is small
    ro.feedback_reward = torch.cat(feedback_parts)  # (N,) (1 - ω)·w·Ĥ, for the diagnostics
    return torch.cat(rewards)


@dataclass(frozen=True)
class Algo:
    """What an advantage estimator needs from the loop. Chosen once, in `ALGOS`."""

    min_group_size: int = 2  # leave-one-out / group std need K >= 2
    greedy_baseline: bool = False  # ReMax: the rollout phase also decodes and scores one greedy response per prompt
    kl_in_loss: bool = True  # the β·KL term of Eq. 2; off where the KL already enters the reward


ALGOS: dict[str, Algo] = {
    "rloo": Algo(),  # Eq. 1
    "grpo": Algo(),
    "remax": Algo(min_group_size=1, greedy_baseline=True),
    "reinforce_pp": Algo(min_group_size=1, kl_in_loss=False),
}


def with_missing_eos_penalty(rewards: torch.Tensor, contains_eos: torch.Tensor, cfg: R2MConfig) -> torch.Tensor:
    """(N,) -> (N,). Choice (TL;DR convention, off by default): a response without EOS gets
    --missing_eos_penalty as its reward for the policy; GREBT's pseudo-labels stay the RM's own rewards."""
    if cfg.missing_eos_penalty is None:
        return rewards
    return torch.where(contains_eos, rewards, torch.full_like(rewards, cfg.missing_eos_penalty))


def compute_advantages(rewards: torch.Tensor, ro: Rollout, greedy_rewards: Optional[torch.Tensor], cfg: R2MConfig) -> torch.Tensor:
    """3. Advantages: rewards (n, K) -> (N,) one per response, or (N, R) one per token (REINFORCE++).
    Choice: this is the only place the estimators differ; all then use the same clipped surrogate (Eq. 2),
    as the R2M paper writes Eq. 2 for both RLOO and GRPO."""
    if cfg.algo == "rloo":
        return rloo_advantages(rewards).reshape(-1)
    if cfg.algo == "grpo":
        return grpo_advantages(rewards).reshape(-1)
    if cfg.algo == "remax":
        return remax_advantages(rewards, greedy_rewards).reshape(-1)
    # REINFORCE++. Choice: the KL in the reward is the plain log-ratio log π_old - log π_ref per sampled
    # token (OpenRLHF's default k1 estimator for it), measured once per step at sampling time; the in-loss
    # k3 KL is then off (`ALGOS`), so β penalises the KL once; no group-mean baseline (that variant is
    # "REINFORCE++-baseline"); with K > 1 every sample is its own trajectory in the batch normalisation.
    kl = ro.old_logprobs - ro.ref_logprobs  # (N, R)
    return reinforce_pp_advantages(rewards.reshape(-1), kl, ro.response_mask, cfg.beta)


def policy_update(
    policy: nn.Module, optimizer: torch.optim.Optimizer, ro: Rollout, advantages: torch.Tensor, cfg: R2MConfig, rt: Runtime
) -> dict:
    """4. Policy optimisation (Eq. 2): k epochs over the step's trajectories in minibatches.

    In the LAST epoch the forward that computes π_θ's log-probs also captures fresh hidden states
    (same hook, no extra pass); they replace `ro.hidden` and are what the reward-model step uses.
    advantages: (N,). Nothing is captured when `ro.hidden` is None (no policy feedback)."""
    policy.train()  # only for gradient checkpointing: dropout was switched off at start-up
    N, P = ro.query_responses.shape[0], ro.prompt_len
    accumulation = cfg.policy_minibatch_size // cfg.micro_batch_size
    stats: dict[str, float] = {}
    n_updates = 0
    for epoch in range(cfg.policy_epochs):
        refresh = epoch == cfg.policy_epochs - 1 and ro.hidden is not None
        order = torch.randperm(N)
        for mb_start in range(0, N, cfg.policy_minibatch_size):
            mb = order[mb_start : mb_start + cfg.policy_minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            for micro in mb.split(cfg.micro_batch_size):
                qr = ro.query_responses[micro].to(rt.device)
                am = ro.attention_mask[micro].to(rt.device)
                with rt.autocast(), HiddenStateCapture(policy, enabled=refresh) as cap:
                    logprobs = sequence_logprobs(policy, qr, am, P, cfg.temperature)  # (b, R)
                loss, s = policy_loss(
                    logprobs,
                    ro.old_logprobs[micro].to(rt.device),
                    ro.ref_logprobs[micro].to(rt.device),
                    advantages[micro].to(rt.device),
                    ro.response_mask[micro].to(rt.device),
                    cfg.clip_eps,
                    cfg.beta if ALGOS[cfg.algo].kl_in_loss else 0.0,
                )
                if refresh:  # copied out before backward, so the float32 states are not held through it
                    ro.hidden.scatter(micro, cap.pop()[:, :-1])
                (loss / accumulation).backward()  # every micro-batch has the same size: exact mean
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v
                n_updates += 1
            stats["policy/grad_norm"] = stats.get("policy/grad_norm", 0.0) + float(
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            ) * accumulation
            optimizer.step()
    # Choice: free the gradients after the step's last update. Kept, they would sit on the GPU (as large as the
    # policy's float32 weights) through the next step's generation, annotation and RM update for nothing.
    optimizer.zero_grad(set_to_none=True)
    if ro.hidden is not None:
        ro.hidden.synchronize()
    return {k: v / n_updates for k, v in stats.items()}


def reward_model_update(
    reward_model, optimizer: torch.optim.Optimizer, ro: Rollout, annotated: torch.Tensor, omega_t: float,
    mode: RewardMode, cfg: R2MConfig, rt: Runtime,
) -> dict:
    """5. Reward-model optimisation (GREBT, Eqs. 5-7): --rm_epochs passes (the paper: one) over the step's
    groups in minibatches.

    annotated: (n, K) rewards from the annotation phase. Rewards are recomputed with the current φ and
    cross-attention from the cached H_last and the fresh hidden states h' of the last policy epoch, at the
    same ω(t) as the annotation of this step; both loss terms use them.
    Choice: which rewards pick the (winner, loser) pair. `--grebt_pairs fresh` (default): the recomputed
    ones. The paper points this way: Fig. 3's caption ("use real-time feedback h' to construct preference
    pairs"), §5.1(3) (R2M's gain over Iterative RM_Head "originates from the recomputation of reward signals
    before RM updates") and Appendix G.5 (Iterative RM_Head is the variant that keeps the scores from
    annotation). `--grebt_pairs annotated` is the other reading (Algorithm 1's lines taken literally);
    the iterative-head mode always uses it, as G.5 defines that baseline."""
    K = cfg.group_size
    n = annotated.shape[0]
    use_annotated = mode.annotated_pairs or cfg.grebt_pairs == "annotated"
    totals = {"rm/grebt": 0.0, "rm/bt": 0.0, "rm/gre": 0.0}
    batches = 0
    for _ in range(cfg.rm_epochs):
        for groups in torch.randperm(n).split(cfg.rm_minibatch_groups):
            optimizer.zero_grad(set_to_none=True)
            # Choice: when the RM body trains too (the whole-RM cost baseline) the minibatch's groups go through the
            # RM in micro-batches of whole groups (about --micro_batch_size sequences), gradients accumulated: the
            # same update, without the activations of rm_minibatch_groups x K full RM passes at once (94 GB at
            # the TL;DR defaults). R2M itself needs no RM forward here, so its minibatch is one piece.
            per_part = max(1, cfg.micro_batch_size // K) if mode.train_body else len(groups)
            for part in groups.split(per_part):
                idx = (part[:, None] * K + torch.arange(K)[None, :]).reshape(-1)  # (g*K,) rows of these groups
                h, h_mask = _feedback_states(ro, idx, mode, rt)
                with rt.autocast():
                    if mode.train_body:  # whole-RM baseline: H_last changes with the body, recompute it with gradients
                        rte = reward_model.reward_token_embedding(
                            ro.rm_input_ids[idx].to(rt.device), ro.rm_attention_mask[idx].to(rt.device), grad=True
                        )
                    else:  # R2M: the body is frozen, so the H_last cached at annotation is exact
                        rte = ro.reward_token_embedding[idx.to(ro.reward_token_embedding.device)]
                    new = reward_model.rewards_from_embedding(rte, h, h_mask, omega_t).view(len(part), K)  # (g, K)
                pair_rewards = annotated[part].to(new.device) if use_annotated else new.detach()  # (g, K)
                weight = len(part) / len(groups)  # Eq. 7 averages over groups: the parts' means, weighted
                loss = grebt_loss(new, pair_rewards, cfg.alpha) * weight
                loss.backward()
                with torch.no_grad():
                    w, l = grebt_pair(pair_rewards)
                    totals["rm/bt"] += weight * bradley_terry_loss(new.gather(1, w).squeeze(1), new.gather(1, l).squeeze(1)).item()
                    totals["rm/gre"] += weight * group_reward_entropy(new).item()
                    totals["rm/grebt"] += loss.item()
            distributed.average_gradients(reward_model.parameters())  # --- distributed: replicated head, mean over ranks ---
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            batches += 1
    optimizer.zero_grad(set_to_none=True)  # as the policy's: no gradients kept until the next step (the whole RM's: GBs)
    return {k: v / batches for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------------
# §5 The loop: set-up, checkpoints, train()
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def feedback_diagnostics(reward_model, feedback_init: Optional[list], feedback_reward: torch.Tensor,
                         rewards: torch.Tensor) -> dict:
    """Is R2M's mechanism engaged? (empty for reward modes without policy feedback)
    - feedback/attn_rel_change: ‖θ - θ₀‖ / ‖θ₀‖ of the cross-attention since it was built;
    - feedback/reward_var_share: Var((1 - ω)·w·Ĥ) / Var(r) over the step's annotated rewards, the share of
      the reward's spread that the policy-feedback path carries (0 at ω = 1)."""
    if feedback_init is None:
        return {}
    params = list(reward_model.policy_feedback.parameters())
    delta = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(params, feedback_init)))
    origin = torch.sqrt(sum((p0**2).sum() for p0 in feedback_init))
    return {
        "feedback/attn_rel_change": (delta / origin).item(),
        "feedback/reward_var_share": (feedback_reward.var() / rewards.var().clamp_min(1e-12)).item(),
    }


def train(
    policy: nn.Module,
    ref_policy: nn.Module,
    reward_model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    cfg: R2MConfig,
    prompt_texts: Optional[list[str]] = None,
    rm_view: Optional[RMView] = None,
    rm_pad_id: int = 0,
    on_step: Optional[Callable[[int, Rollout, torch.Tensor], dict]] = None,
    tracker=None,
    preferences: Optional[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> list[dict]:
    """Run Algorithm 1 for cfg.total_steps steps; returns the per-step metrics (also in metrics.jsonl).

    policy / ref_policy: Hugging Face causal LMs (the same weights at start); reward_model: an
    `R2MRewardModel` (or `brme.BRMEReward`); tokenizer: the policy's; prompts: tokenised prompts;
    prompt_texts: the raw prompts (what the RM reads); rm_view: None when the RM shares the policy's
    tokenizer (it then reads the policy's token ids), else `make_rm_view(rm_tokenizer, ...)`.
    on_step(step, rollout, rewards (N,)) -> dict: extra metrics for the step's record (e.g. a gold reward in
    a controlled experiment); called after the step's updates.
    tracker: None, or an experiment tracker (`launch/tracking.py`: TensorBoard / W&B); `tracker.log(record, samples)`
    gets each step's metrics record and the (prompt, response, reward) samples printed at that step, if any.
    preferences: (chosen (ids, mask), rejected (ids, mask)), (M, S) each in the RM's view: the pairs that the
    Pretrained RM (`--reward pretrained_rm`) and BRME (`--reward brme`) are fitted on before RL (not on resume)."""
    cfg.validate()
    if not prompts:
        raise ValueError("no prompts to train on")
    if rm_view is not None and (prompt_texts is None or len(prompt_texts) != len(prompts)):
        raise ValueError("an RM with its own tokenizer needs prompt_texts, one per prompt")
    mode, algo = REWARD_MODES[cfg.reward], ALGOS[cfg.algo]
    if mode.ensemble != getattr(reward_model, "is_ensemble", False):
        raise ValueError(f"--reward {cfg.reward} needs {'a brme.BRMEReward' if mode.ensemble else 'an R2MRewardModel'}")
    T, K, n = cfg.total_steps, cfg.group_size, cfg.queries_per_step
    # --- distributed: under torchrun each rank runs this same loop on n/N of each step's prompts, with
    # minibatches cut to match (`rank_cfg`); on one process rank = 0, world_size = 1 and rank_cfg is cfg ---
    rank, world_size = distributed.rank_and_world_size()
    rank_cfg = distributed.per_rank_config(cfg, world_size, train_body=mode.train_body, pretrain=mode.pretrain)
    resuming = cfg.resume and has_checkpoint(cfg.output_dir)
    fit_before_rl = (mode.pretrain or mode.ensemble) and not resuming  # a resumed run has them in its checkpoint
    if fit_before_rl and preferences is None:
        raise ValueError(f"--reward {cfg.reward} is fitted on preference pairs before RL: pass preferences")

    # --- seeding (sampling differs per rank: seed + rank) -----------------------------------------------
    devices.seed_everything(cfg.seed + rank)
    rt = devices.make_runtime(cfg)
    devices.prepare_models(policy, ref_policy, reward_model, rt, fine_tune_body=mode.pretrain and not resuming)
    # --- distributed: FSDP2-shard the models across ranks, each keeping its shard on its device; on one process
    # they move to the device whole ---
    distributed.place_models(policy, ref_policy, reward_model, rt.device, bf16_compute=rt.autocast_dtype is not None)

    # --- optimisers. Choice: AdamW without weight decay, learning rate decaying linearly to 0 over T (or
    # --lr_schedule constant), stepped once per RL step; gradient-norm clip --max_grad_norm (1.0) for the policy
    # and the RM head alike --------------------------------------------------------------------------------
    decay = (lambda s: max(0.0, 1.0 - s / T)) if cfg.lr_schedule == "linear" else (lambda s: 1.0)  # noqa: E731
    # Choice: fused AdamW on GPU: one kernel updates each tensor in place, where the default multi-tensor
    # version makes full-size temporaries (as large as the policy's float32 weights) at the optimiser step.
    fused = rt.device.type == "cuda"
    optimizers = {"policy": torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr, weight_decay=0.0, fused=fused)}
    if mode.train_body:  # Choice: the cost baseline trains the body in its stored dtype (bf16 on GPU): a lower
        reward_model.reward_model.base_model.requires_grad_(True)  # bound on what updating the whole RM costs
        if rt.gradient_checkpointing:  # as the policy's: activations recomputed in backward (train mode only)
            devices.checkpoint_activations(reward_model.reward_model.train())
    if mode.train:
        rm_params = list(reward_model.trainable_parameters(feedback=mode.feedback, body=mode.train_body))
        optimizers["reward_model"] = torch.optim.AdamW(rm_params, lr=cfg.rm_lr, weight_decay=0.0, fused=fused)
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, decay) for k, o in optimizers.items()}
    # Non-finite values (a diverging learning rate, an RM with absurd weights) never reach the weights: an optimiser
    # step with a non-finite gradient is skipped and counted; cfg.max_nonfinite_steps such RL steps in a row stop.
    guarded = {k: SkipNonFiniteSteps(o) for k, o in optimizers.items()}
    nonfinite = NonFiniteStreak(cfg.max_nonfinite_steps)

    # The cross-attention as built (a function of the seed alone): the origin of its relative weight change.
    feedback_init = [p.detach().clone() for p in reward_model.policy_feedback.parameters()] if mode.feedback else None

    check_output_dir(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    start = 0
    if cfg.overwrite:
        delete_checkpoints(cfg.output_dir)
    if resuming:
        fitted = "the fitted BRME heads" if mode.ensemble else "the fine-tuned RM" if mode.pretrain else ""
        start = load_checkpoint(cfg.output_dir, policy, reward_model, optimizers, schedulers, cfg, fitted)
        distributed.decorrelate_rng()  # --- distributed: ranks restored rank 0's generator; one stream each ---
        distributed.print0(f"resumed from {cfg.output_dir}/{CHECKPOINT_DIR} at step {start}/{T}")
    elif cfg.resume:
        distributed.print0(f"--resume: {cfg.output_dir} holds no run yet: starting a new run at step 0")
    if fit_before_rl:  # the Pretrained RM's fine-tuning, or BRME's heads, before the first step
        distributed.print0(reward_model.fit_before_rl(*preferences, cfg=cfg, rt=rt))
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start_metrics(metrics_path, start)  # a fresh curve, or the resumed run's up to its checkpoint

    history: list[dict] = []
    bar = reporting.progress_bar(start, T, f"{cfg.algo}+{cfg.reward}")
    for step in bar:
        t0 = time.perf_counter()
        omega_t = omega(step, T, cfg.omega_floor) if mode.feedback else 1.0
        chosen = step_prompt_indices(len(prompts), n, step, cfg.seed)
        n_rank = rank_cfg.queries_per_step  # --- distributed: this rank's whole groups (all of them on one process) ---
        chosen = chosen[rank * n_rank : (rank + 1) * n_rank]
        batch = [prompts[i] for i in chosen]
        batch_texts = [prompt_texts[i] for i in chosen] if prompt_texts is not None else None

        # 1. trajectory sampling (+ old/ref log-probs, + hidden states via the hook). The previous step's rollout
        # goes first: its hidden states are gigabytes of host memory the new ones would otherwise sit beside.
        ro = None
        ro = rollout(policy, ref_policy, tokenizer, batch, batch_texts, cfg, rt, rm_view, rm_pad_id, mode.feedback)
        greedy_rewards = None
        if algo.greedy_baseline:  # ReMax: one greedy response per prompt, scored like the samples (n,)
            greedy_rewards, greedy_eos = greedy_baseline(policy, reward_model, tokenizer, batch, batch_texts, omega_t,
                                                         mode, cfg, rt, rm_view, rm_pad_id)
            greedy_rewards = with_missing_eos_penalty(greedy_rewards, greedy_eos, cfg)
        t1 = time.perf_counter()
        # 2. reward annotation
        rm_rewards = annotate_rewards(reward_model, ro, omega_t, mode, cfg, rt)  # (N,)
        rewards = with_missing_eos_penalty(rm_rewards, ro.contains_eos, cfg)
        t2 = time.perf_counter()
        # 3. advantages (inside each group, or over the rank's batch for REINFORCE++)
        advantages = compute_advantages(rewards.view(n_rank, K), ro, greedy_rewards, rank_cfg)  # (N,) or (N, R)
        # 4. policy optimisation, with the hidden-state refresh in the last epoch
        pstats = policy_update(policy, guarded["policy"], ro, advantages, rank_cfg, rt)
        t3 = time.perf_counter()
        # 5. reward-model optimisation (GREBT)
        rstats = {}
        if mode.train:
            rstats = reward_model_update(
                reward_model, guarded["reward_model"], ro, rm_rewards.view(n_rank, K), omega_t, mode, rank_cfg, rt
            )
        t4 = time.perf_counter()
        with warnings.catch_warnings():  # a skipped (non-finite) first update is no misordering: the schedule is
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step..")  # still per RL step
            for s in schedulers.values():
                s.step()

        resp_len = ro.response_mask.sum(1).float()
        kl_seq = ((ro.old_logprobs - ro.ref_logprobs) * ro.response_mask).sum(1)
        record = {
            "step": step,
            "omega": omega_t,
            "reward/mean": rewards.mean().item(),
            "reward/std": distributed.gather_rows(rewards).std().item(),  # --- distributed: over all ranks ---
            "reward/rm_mean": rm_rewards.mean().item(),
            "reward/group_std": rewards.view(-1, K).std(dim=1).mean().item() if K > 1 else 0.0,
            **({"reward/greedy_mean": greedy_rewards.mean().item()} if greedy_rewards is not None else {}),
            "response/length": resp_len.mean().item(),
            "response/eos_frac": ro.contains_eos.float().mean().item(),
            "kl/sequence": kl_seq.mean().item(),
            "kl/token": (kl_seq.sum() / resp_len.sum().clamp_min(1)).item(),  # the paper's Fig. 5 KL
            **pstats,
            **rstats,
            **feedback_diagnostics(reward_model, feedback_init, ro.feedback_reward, rm_rewards),
            "lr/policy": schedulers["policy"].get_last_lr()[0],
            "time/rollout": t1 - t0,
            "time/reward": t2 - t1,
            "time/policy": t3 - t2,
            "time/reward_model": t4 - t3,
            "time/step": t4 - t0,
        }
        if on_step is not None:
            record.update(on_step(step, ro, rewards))
        record["nonfinite/skipped_updates"] = sum(g.skipped for g in guarded.values())
        for g in guarded.values():
            g.skipped = 0
        record = distributed.mean_over_ranks(record)  # --- distributed: one record for all ranks, written once ---
        history.append(record)
        append_metrics(metrics_path, record)  # --- distributed: by rank 0; should it fail, every rank stops ---
        reporting.show_step(bar, record)
        samples = (reporting.show_samples(tokenizer, batch, ro.query_responses, ro.response_mask, ro.prompt_len,
                                          rewards, K) if cfg.sample_every and step % cfg.sample_every == 0 else [])
        if tracker is not None:
            tracker.log(record, samples)
        # Non-finite values: --max_nonfinite_steps steps in a row stop the run, as does ending on one
        nonfinite.update(record, step, last_step=T - 1)
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step == T - 1):
            if nonfinite:  # a step with non-finite values is no state to resume from
                distributed.print0(f"step {step}: no checkpoint after non-finite values; the last good one stays")
            else:
                save_checkpoint(cfg.output_dir, step, policy, tokenizer, reward_model, optimizers, schedulers, cfg)
    return history
