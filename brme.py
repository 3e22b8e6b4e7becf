"""BRME: the reward-robust RLHF baseline (Yan et al., "Reward-Robust RLHF in LLMs", arXiv:2409.15360).

A Bayesian Reward Model Ensemble: E Gaussian heads on the frozen RM's reward-token embedding, fitted before
RL on a preference file and then frozen. During RL the reward is r_robust = (1 - λ)·r_nominal + λ·r_min
(Yan et al.'s reward-robust objective). It is a reward mode of the same loop (`--reward brme`, a row this module adds
to `r2m.REWARD_MODES`), not a second trainer: `BRMEReward` is an `r2m.FrozenRewardBody` like R2M's reward model,
fitted before RL (`fit_before_rl`), so `r2m.train` uses it unchanged.

The full BRME paper was not available to us; every point that reconstructs it is a "Choice:" below.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import distributed
from plumbing.devices import Runtime, float32_only
import r2m
from r2m import FrozenRewardBody, R2MConfig


def gaussian_bradley_terry_loss(
    mu_w: torch.Tensor, sigma_w: torch.Tensor, mu_l: torch.Tensor, sigma_l: torch.Tensor
) -> torch.Tensor:
    """(B,) x 4 -> (). BRME's per-head preference likelihood, averaged over pairs.

    Choice (our reconstruction of the BRME paper): with Gaussian rewards the probit-style closed form
    P(w ≻ l) = σ((μ_w - μ_l) / sqrt(1 + (π/8)(σ_w² + σ_l²))); loss = -log P. A head can only lower the
    loss on pairs it gets wrong by widening σ there, so σ grows where pairs are ambiguous."""
    scale = torch.sqrt(1 + (math.pi / 8) * (sigma_w**2 + sigma_l**2))
    return -F.logsigmoid((mu_w - mu_l) / scale).mean()


def robust_reward(mu: torch.Tensor, sigma: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, E), (B, E) -> (B,). The BRME paper's reward-robust objective: r_robust = (1 - λ)·r_nominal + λ·r_min.

    r_nominal: the mean of the head with the smallest σ for that sample; r_min: the smallest head mean."""
    nominal = mu.gather(1, sigma.argmin(dim=1, keepdim=True)).squeeze(1)  # (B,)
    worst = mu.min(dim=1).values  # (B,)
    return (1 - lam) * nominal + lam * worst


@torch.no_grad()
def reward_token_embeddings(reward_model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
                            runtime: Runtime) -> torch.Tensor:
    """Right-padded RM inputs (M, S) -> H_last (M, D_rm) in float32 on the device, `batch_size` rows at a time, each
    batch cut to its own longest row (preference pairs for the fits before RL)."""
    # --- distributed: each process embeds an equal share (the last row repeated to fill it) and all get every row ---
    rank, world_size = distributed.rank_and_world_size()
    M = ids.shape[0]
    share = -(-M // world_size)
    rows_here = torch.arange(rank * share, (rank + 1) * share).clamp_max(M - 1)
    out = []
    for rows in rows_here.split(batch_size):
        L = int(mask[rows].sum(1).max())
        with runtime.autocast():
            out.append(reward_model.reward_token_embedding(ids[rows, :L].to(runtime.device),
                                                           mask[rows, :L].to(runtime.device)).float())
    return distributed.gather_rows(torch.cat(out))[:M]


class BRMEReward(FrozenRewardBody):
    """Bayesian Reward Model Ensemble: E Gaussian heads on the frozen RM's reward-token embedding.

    Choice (our reconstruction of the BRME paper): head e = Linear(D_rm -> 2) giving (μ_e, log σ_e); the μ row starts
    from the pretrained score head plus small noise (10% of its weights' std), log σ starts at 0 (σ = 1).
    The heads are trained before RL by `fit_brme_heads`, then frozen; policy feedback is not used."""

    fit_description = "the fitted BRME heads"  # what a resumed run's checkpoint holds of the fit before RL

    def __init__(self, reward_model: nn.Module, num_heads: int = 5, lam: float = 0.4, seed: int = 0):
        super().__init__(reward_model)
        d_rm = reward_model.score.in_features
        self.lam = lam
        self.heads = nn.Linear(d_rm, 2 * num_heads).float()  # rows 2e, 2e+1: μ_e, log σ_e
        g = torch.Generator().manual_seed(seed)
        w = reward_model.score.weight.detach().float()[0]  # (D_rm,)
        b = reward_model.score.bias.detach().float()[0] if reward_model.score.bias is not None else torch.tensor(0.0)
        with torch.no_grad():
            noise = 0.1 * w.std() * torch.randn(num_heads, d_rm, generator=g)
            self.heads.weight.view(num_heads, 2, d_rm)[:, 0] = w + noise
            self.heads.weight.view(num_heads, 2, d_rm)[:, 1] = 0.0
            self.heads.bias.view(num_heads, 2)[:, 0] = b
            self.heads.bias.view(num_heads, 2)[:, 1] = 0.0

    @property
    def num_heads(self) -> int:
        return self.heads.out_features // 2

    def head_distributions(self, rte: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D_rm) -> μ (B, E), σ (B, E), in float32 even under bf16 autocast, as R2M's rewards (`float32_only`):
        the heads were fitted in float32, and RL must see the rewards they were fitted to give."""
        with float32_only(rte):
            out = self.heads(rte.float()).view(rte.shape[0], self.num_heads, 2)  # (B, E, 2)
            return out[..., 0], out[..., 1].clamp(-6.0, 6.0).exp()  # log σ clamped: σ in [2.5e-3, 403]

    def rewards_from_embedding(self, rte, h=None, h_mask=None, omega: float = 1.0) -> torch.Tensor:
        """(B, D_rm) -> (B,) robust reward; h and ω are ignored (BRME has no policy feedback)."""
        mu, sigma = self.head_distributions(rte)
        return robust_reward(mu, sigma, self.lam)

    def trainable_parameters(self, feedback: bool = True) -> Iterator[nn.Parameter]:
        yield from self.heads.parameters()

    @classmethod
    def build(cls, rm: nn.Module, cfg: R2MConfig, d_policy: int) -> "BRMEReward":
        return cls(rm, num_heads=cfg.brme_heads, lam=cfg.brme_lambda, seed=cfg.seed)

    def trainable_state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "lam": self.lam}

    def fit_before_rl(self, chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor],
                      cfg: R2MConfig, runtime: Runtime) -> str:
        """Fit the heads on preference pairs (ids, mask) (M, S) in the RM's view, before RL; one line to print.
        The frozen body runs once per response (`reward_token_embeddings`; under torchrun each process
        embeds a share), then every process fits the same heads and keeps rank 0's."""
        chosen_rte = reward_token_embeddings(self, *chosen, cfg.forward_batch_size, runtime)  # (M, D_rm)
        rejected_rte = reward_token_embeddings(self, *rejected, cfg.forward_batch_size, runtime)
        accuracies = fit_brme_heads(self, chosen_rte, rejected_rte, cfg.brme_epochs, cfg.brme_lr, seed=cfg.seed,
                                    sigma_prior=cfg.brme_sigma_prior)
        distributed.broadcast_parameters(self.heads.parameters())  # --- distributed: every rank keeps rank 0's fit ---
        return (f"BRME: {self.num_heads} heads on {len(chosen[0])} pairs; train accuracy per head "
                + ", ".join(f"{a:.3f}" for a in accuracies))

    def load_trainable_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.lam = state["lam"]


def fit_brme_heads(
    brme: BRMEReward,
    chosen_rte: torch.Tensor,
    rejected_rte: torch.Tensor,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    sigma_prior: float = 0.01,
) -> list[float]:
    """Train each BRME head on its own bootstrap resample of the preference pairs (Gaussian BT loss).

    chosen_rte, rejected_rte: (M, D_rm) reward-token embeddings of the chosen / rejected responses, computed
    once with the frozen body (`reward_token_embedding`), so training the heads needs no RM forward.
    Returns each head's training accuracy (fraction of its resample with μ_chosen > μ_rejected)."""
    M, E = chosen_rte.shape[0], brme.num_heads
    if M == 0:
        raise ValueError("BRME needs at least one preference pair")
    g = torch.Generator().manual_seed(seed)
    device = brme.heads.weight.device
    chosen_rte, rejected_rte = chosen_rte.to(device).float(), rejected_rte.to(device).float()
    # Choice: one bootstrap resample (M draws with replacement) per head, fixed for all epochs.
    samples = torch.randint(0, M, (E, M), generator=g)  # (E, M)
    optimizer = torch.optim.AdamW(brme.heads.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        order = torch.randperm(M, generator=g)
        for s in range(0, M, batch_size):
            rows = samples[:, order[s : s + batch_size]]  # (E, b): each head its own pairs
            mu_w, sig_w = brme.head_distributions(chosen_rte[rows.reshape(-1)])  # (E*b, E)
            mu_l, sig_l = brme.head_distributions(rejected_rte[rows.reshape(-1)])
            # keep head e's outputs on head e's pairs only: block-diagonal pick, (E, b)
            pick = lambda x: x.view(E, -1, E).diagonal(dim1=0, dim2=2).T  # noqa: E731
            loss = gaussian_bradley_terry_loss(pick(mu_w), pick(sig_w), pick(mu_l), pick(sig_l)) * E
            # Choice: a weak prior γ·(log σ)² pulls σ toward 1. Where a head cannot order a pair (margin ~0)
            # the likelihood above is flat in σ, so without a prior σ there is not identified and drifts
            # down with the rest; with it, σ shrinks only where pairs are consistently separated.
            log_sigmas = torch.cat([pick(sig_w), pick(sig_l)]).log()
            loss = loss + sigma_prior * E * (log_sigmas**2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        mu_w, _ = brme.head_distributions(chosen_rte)
        mu_l, _ = brme.head_distributions(rejected_rte)
        correct = (mu_w > mu_l).float()  # (M, E)
        return [correct[samples[e], e].mean().item() for e in range(E)]


# BRME's row of r2m's reward modes: its heads are fitted on --brme_preference_file before RL, no policy feedback
r2m.REWARD_MODES["brme"] = r2m.RewardMode(sees_policy=False, train=False, reward_model=BRMEReward,
                                          fit_on="brme_preference_file")
