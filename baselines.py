"""The R2M paper's baselines beside R2M, each a row of r2m.py's tables (added below when this module is imported).

    --algo remax            ReMax (Li et al., 2023): the greedy response's reward is the baseline
    --algo reinforce_pp     REINFORCE++ (Hu, 2025): no critic, the KL in the per-token reward, batch-normalised
    --reward r2m_noise      R2M w/ noise: h replaced by Gaussian noise of h's mean and variance (paper's ablation)
    --reward pretrained_rm  Pretrained RM (App. G.5): the whole RM fine-tuned with BT on preference pairs before RL
    --reward r2m_full_rm    the cost baseline R2M is measured against: every RM parameter trains in the GREBT step

They run the same loop (`r2m.rl_step`): an estimator changes step 3 (and ReMax adds a greedy response to step 1); a
reward mode brings its own reward-model class, a subclass of `r2m.R2MRewardModel`. BRME is in brme.py.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import r2m
from plumbing import devices, distributed
from plumbing.checkpoints import TrainingError
from plumbing.data import RMView, pad_left, pad_token_id, rm_inputs
from plumbing.devices import HostRows, Runtime

# ----------------------------------------------------------------------------------------------------
# ReMax: the reward of the policy's greedy response is each group's baseline
# ----------------------------------------------------------------------------------------------------


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """(n, K), (n,) -> (n, K). A_ij = r_ij - r(x_i, ŷ_i), ŷ_i the policy's greedy response to prompt i."""
    return rewards - greedy_rewards[:, None]


class GenerationStateCapture(r2m.HiddenStateCapture):
    """The policy's last-layer states during `generate()`, for greedy responses no forward is run on: the same hook on
    the backbone's output, where with a KV cache the prefill gives positions 0..P-1 and each decoding step one more;
    `end_batch` writes one generate() call's pieces into rows of `hidden` (a HostRows): the positions whose outputs
    predicted a real token, as `HiddenStateCapture` gives them."""

    def __init__(self, policy: nn.Module, hidden: HostRows):
        super().__init__(policy)
        self.hidden = hidden
        self._pieces: list[torch.Tensor] = []

    def _hook(self, module, inputs, output):
        self._pieces.append(output[0].detach())  # (b, s, D_p): s = P at prefill, then 1 per decoding step

    def end_batch(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Close one generate() call whose sequences are rows `rows` (b,): mask (b, S) marks, in the call's columns,
        the positions that predicted a real token (the states stop earlier when generation stopped early)."""
        states = torch.cat(self._pieces, dim=1)  # (b, S' <= S, D_p)
        self._pieces = []
        self.hidden.scatter(rows, F.pad(states, (0, 0, 0, mask.shape[1] - states.shape[1])), mask)


@torch.no_grad()
def greedy_baseline(policy: nn.Module, reward_model: r2m.FrozenRewardBody, tokenizer, prompts: list[list[int]],
                    prompt_texts: Optional[list[str]], omega_t: float, cfg: r2m.R2MConfig, runtime: Runtime,
                    rm_view: Optional[RMView], rm_pad_id: int) -> torch.Tensor:
    """ReMax's baseline -> (n,): the reward of the policy's greedy response to each prompt, scored exactly as the
    samples are (the same reward mode and ω(t), the missing-EOS penalty). Part of step 1: one greedy generation and one
    RM score per prompt; with policy feedback, h is captured during the greedy generation (no policy forward added)."""
    policy.eval()
    query_ids, query_mask = pad_left(prompts, pad_token_id(tokenizer))  # (n, P)
    P, n = query_ids.shape[1], len(prompts)
    room = [len(p) + cfg.max_new_tokens - 1 for p in prompts]  # each row's most positions: a response of R tokens
    capture = GenerationStateCapture(policy, HostRows.for_policy(room, policy, runtime)) \
        if r2m.REWARD_MODES[cfg.reward].sees_policy else None
    responses = []
    for rows in torch.arange(n).split(cfg.generation_batch_size):
        with capture if capture is not None else contextlib.nullcontext():
            responses.append(r2m.generate_responses(policy, query_ids[rows], query_mask[rows], tokenizer, cfg, runtime,
                                                    greedy=True))  # (b, R) each
        if capture is not None:  # the call's columns: the batch's own longest prompt, then the responses
            prompt = r2m.window(query_mask[rows])
            capture.end_batch(rows, r2m.hidden_state_mask(torch.cat([query_mask[rows, prompt], responses[-1][1]], 1)))
    response_ids, response_mask = (torch.cat(x) for x in zip(*responses))  # (n, R)
    query_responses = torch.cat([query_ids, response_ids], dim=1)  # (n, P+R)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    rm_ids, rm_mask = rm_inputs(tokenizer, query_responses, attention_mask, response_ids, response_mask, prompt_texts,
                                rm_view, rm_pad_id)
    greedy = r2m.Rollout(
        query_responses=query_responses, attention_mask=attention_mask, response_mask=response_mask,
        old_logprobs=None, ref_logprobs=None,  # a baseline is scored, never trained on
        hidden=capture.hidden if capture is not None else None,
        rm_input_ids=rm_ids, rm_attention_mask=rm_mask, prompt_len=P,
        contains_eos=(response_ids == tokenizer.eos_token_id).any(dim=1),
    )
    rewards = r2m.annotate_rewards(reward_model, greedy, omega_t, cfg, runtime)[0]  # (n,)
    return r2m.with_missing_eos_penalty(rewards, greedy.contains_eos, cfg)


# ----------------------------------------------------------------------------------------------------
# REINFORCE++: no critic; the KL to the reference in the per-token reward; returns normalised over the batch
# ----------------------------------------------------------------------------------------------------


def reinforce_pp_advantages(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            eps: float = 1e-8) -> torch.Tensor:
    """(N,), (N, R), (N, R) -> (N, R). Per-token rewards r_t = -β·KL_t, plus the RM's score on the last response
    token; the return G_t = Σ_{t' >= t} r_t' (γ = 1); advantages: the returns normalised over every response token of
    the whole batch (not per group). kl: per-token KL of π_old to π_ref; mask: 1 up to and including EOS."""
    mask = mask.float()
    token_rewards = -beta * kl * mask  # (N, R)
    last = (mask.sum(dim=1) - 1).clamp_min(0).long()  # (N,) the last response token
    token_rewards[torch.arange(len(rewards)), last] += rewards
    returns = token_rewards.flip(1).cumsum(dim=1).flip(1)  # (N, R): G_t, the sum of future rewards
    valid = returns[mask.bool()]
    return (returns - valid.mean()) / (valid.std() + eps) * mask


def reinforce_pp_step_advantages(rewards: torch.Tensor, trajectories: r2m.Rollout, baseline, cfg) -> torch.Tensor:
    """Step 3 for REINFORCE++: rewards (n, K) -> (N, R) per token.
    Choice: the KL in the reward is the plain log-ratio log π_old - log π_ref per sampled token (OpenRLHF's default
    k1 estimator for it), measured at sampling time; Eq. 2's in-loss KL is then off (its row), so β counts once; no
    group-mean baseline (that is "REINFORCE++-baseline"); with K > 1 every sample is its own trajectory."""
    kl = trajectories.old_logprobs - trajectories.ref_logprobs  # (N, R)
    return reinforce_pp_advantages(rewards.reshape(-1), kl, trajectories.response_mask, cfg.beta)


# ----------------------------------------------------------------------------------------------------
# R2M w/ noise: the cross-attention reads Gaussian noise with h's mean and variance instead of h
# ----------------------------------------------------------------------------------------------------


def gaussian_like(h: torch.Tensor, h_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, D), (B, S) -> (B, S, D): noise with h's mean and variance.
    Choice: per sequence and per feature, over the sequence's real positions."""
    m = h_mask[..., None].to(h.dtype)  # (B, S, 1)
    count = m.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    mean = (h * m).sum(dim=1, keepdim=True) / count  # (B, 1, D)
    std = (((h - mean) ** 2 * m).sum(dim=1, keepdim=True) / count).sqrt()  # (B, 1, D)
    return mean + std * torch.randn_like(h)


class NoisyFeedbackRewardModel(r2m.R2MRewardModel):
    """R2M whose cross-attention reads noise instead of the policy's states, at annotation and in GREBT alike."""

    def reward_parts(self, h_last, h=None, h_mask=None, omega: float = 1.0):
        return super().reward_parts(h_last, gaussian_like(h.float(), h_mask) if h is not None else None, h_mask, omega)


# ----------------------------------------------------------------------------------------------------
# The Pretrained RM (App. G.5): the whole RM fine-tuned with Bradley-Terry before RL, then frozen
# ----------------------------------------------------------------------------------------------------


def pretrain_reward_model(reward_model: r2m.R2MRewardModel, chosen: tuple[torch.Tensor, torch.Tensor],
                          rejected: tuple[torch.Tensor, torch.Tensor], cfg: r2m.R2MConfig,
                          runtime: Runtime) -> tuple[float, float]:
    """Before RL, fine-tune the whole RM (body and score head φ) with the Bradley-Terry loss (Eq. 5) on preference
    pairs of the prompts the policy trains on; RL then runs with it frozen, without policy feedback.
    chosen, rejected: (ids (M, S), mask (M, S)) the RM's view of each pair's two responses, right-padded.
    -> the RM's accuracy on these pairs (r_chosen > r_rejected) before and after.
    Choice: AdamW without weight decay at --pretrain_rm_lr (App. G.5: 1e-6), --pretrain_rm_epochs passes in shuffled
    minibatches of exactly --pretrain_rm_batch_size pairs (the few an epoch's shuffle leaves over wait for the next,
    so N processes split every minibatch evenly), float32 master weights under the run's autocast, the loop's clip."""
    body = reward_model.reward_model.base_model
    # --- distributed: under torchrun the body is FSDP-sharded (float32 shards, bf16 compute with --bf16) and each
    # process takes its share of every minibatch; on one process it is moved whole and fine-tuned in float32 ---
    rank, world_size = distributed.rank_and_world_size()
    sharded = distributed.is_sharded(body)
    if not sharded:
        reward_model.to(runtime.device)
        devices.cast_parameters(reward_model.reward_model, torch.float32)
    M, B = chosen[0].shape[0], cfg.pretrain_rm_batch_size
    if M < B:
        raise TrainingError(f"the preference file holds {M} pairs, fewer than --pretrain_rm_batch_size {B}")
    body.train().requires_grad_(True)  # dropout was switched off at start-up; train mode only for what the model does
    if runtime.gradient_checkpointing:  # activations recomputed in backward, as the policy's
        devices.checkpoint_activations(reward_model.reward_model)
    params = list(body.parameters()) + list(reward_model.score_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.pretrain_rm_lr, weight_decay=0.0, fused=runtime.device.type == "cuda")

    def rewards(pair: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:  # (b,)
        L = int(pair[1][rows].sum(1).max())  # right-padded: the batch is cut to its own longest row
        ids, mask = pair[0][rows, :L].to(runtime.device), pair[1][rows, :L].to(runtime.device)
        with runtime.autocast():
            return reward_model.rewards_from_embedding(reward_model.reward_token_embedding(ids, mask, grad=True))

    @torch.no_grad()
    def accuracy() -> float:
        share = M // world_size  # every process scores as many pairs (under FSDP: as many forwards)
        mine = torch.arange(rank * share, (rank + 1) * share)
        wins = sum(int((rewards(chosen, rows) > rewards(rejected, rows)).sum())
                   for rows in mine.split(cfg.forward_batch_size))
        return distributed.sum_over_ranks(wins) / (share * world_size)

    before = accuracy()
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.pretrain_rm_epochs):
        order = torch.randperm(M, generator=g)
        for k in range(M // B):
            rows = order[k * B : (k + 1) * B].chunk(world_size)[rank]  # this process's share of the minibatch
            loss = r2m.bradley_terry_loss(rewards(chosen, rows), rewards(rejected, rows))  # Eq. 5
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
    if runtime.gradient_checkpointing:
        devices.checkpoint_activations(reward_model.reward_model, enabled=False)
    after = accuracy()
    if not sharded:  # stored like the other frozen models from now on (a sharded one computes in bf16 anyway)
        devices.cast_parameters(reward_model.reward_model, runtime.frozen_dtype)
    return before, after


class PretrainedRewardModel(r2m.R2MRewardModel):
    """The RM fine-tuned before RL (`pretrain_reward_model`), then frozen: R2M's reward model without feedback."""

    save_body = True  # checkpoints keep the fine-tuned body, also of a run resumed after the fine-tuning
    fine_tunes_body = True  # its body stays float32 until the fine-tuning is done
    split_over_processes = ("pretrain_rm_batch_size",)  # under torchrun each process takes a share of a minibatch
    fit_description = "the fine-tuned RM"

    def fit_before_rl(self, chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor],
                      cfg: r2m.R2MConfig, runtime: Runtime) -> str:
        before, after = pretrain_reward_model(self, chosen, rejected, cfg, runtime)
        return (f"Pretrained RM: BT fine-tuning of the whole RM on {len(chosen[0])} pairs, {cfg.pretrain_rm_epochs} "
                f"epoch(s) at lr {cfg.pretrain_rm_lr:g}: pair accuracy {before:.3f} -> {after:.3f}")


# ----------------------------------------------------------------------------------------------------
# The whole RM: R2M with every RM parameter trainable (what R2M avoids: the GREBT step must run the RM body)
# ----------------------------------------------------------------------------------------------------


class WholeRewardModel(r2m.R2MRewardModel):
    """Choice: the body trains in its stored dtype (bf16 on a GPU), a lower bound on what updating the whole RM costs;
    its GREBT step runs the RM in passes of whole groups (about --micro_batch_size sequences, gradients accumulated:
    the same update without the activations of rm_minibatch_groups x K RM passes at once, 94 GB at the TL;DR
    defaults), recomputing H_last with gradients; the loop recomputes its activations under --gradient_checkpointing."""

    one_process_only = True

    def __init__(self, reward_model: nn.Module, d_policy: int, d_attn: int = 2048, seed: int = 0):
        super().__init__(reward_model, d_policy, d_attn, seed)
        self.reward_model.base_model.requires_grad_(True)

    def trainable_parameters(self, feedback: bool = True):
        yield from super().trainable_parameters(feedback)
        yield from self.reward_model.base_model.parameters()

    def update_passes(self, groups: torch.Tensor, cfg: r2m.R2MConfig) -> list[torch.Tensor]:
        return list(groups.split(max(1, cfg.micro_batch_size // cfg.group_size)))

    def update_embedding(self, trajectories: r2m.Rollout, rows: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        """H_last changes with the body: recomputed, with gradients (the pass cut to its own longest row)."""
        cols = r2m.window(trajectories.rm_attention_mask[rows])
        return self.reward_token_embedding(trajectories.rm_input_ids[rows, cols].to(runtime.device),
                                           trajectories.rm_attention_mask[rows, cols].to(runtime.device), grad=True)


# ----------------------------------------------------------------------------------------------------
# The baselines' rows of r2m's tables
# ----------------------------------------------------------------------------------------------------

r2m.ALGOS.update(
    remax=r2m.Algo(lambda rewards, trajectories, baseline, cfg: remax_advantages(rewards, baseline).reshape(-1),
                   min_group_size=1, baseline=greedy_baseline),
    reinforce_pp=r2m.Algo(reinforce_pp_step_advantages, min_group_size=1, kl_in_loss=False),
)
r2m.REWARD_MODES.update(
    r2m_noise=r2m.RewardMode(sees_policy=True, train=True, reward_model=NoisyFeedbackRewardModel),
    pretrained_rm=r2m.RewardMode(sees_policy=False, train=False, reward_model=PretrainedRewardModel,
                                 fit_on="pretrain_rm_preference_file"),
    r2m_full_rm=r2m.RewardMode(sees_policy=True, train=True, reward_model=WholeRewardModel),
)
