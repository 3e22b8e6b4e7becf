"""R2M, the Real-Time Aligned Reward Model (Huang et al., ICML 2026, arXiv:2601.22664), in the order of its Algorithm 1.

RLHF policies learn to exploit a frozen reward model (RM). R2M keeps the RM's LLM body frozen but lets it see the
policy: a cross-attention reads the policy's last-layer hidden states h (Eq. 3), its output is blended with the RM's
reward-token embedding by a schedule ω(t) (Eq. 4), and after every RL step only that cross-attention and the score
head are retrained with GREBT (Eqs. 5-7). The RL loop is RLOO (Eq. 1) or GRPO with Eq. 2's clipped surrogate.
Top to bottom: settings; h; Eq. 3; Eq. 4 and the reward model; sampling and annotation; advantages and the policy
update; GREBT; the table of variants; `rl_step`, one step of Algorithm 1; `train`. The paper's baselines are in
baselines.py, BRME in brme.py; each adds its rows to the tables here. "Choice:" marks where the paper is silent.
Run it: `python train_tldr.py` (one GPU, the paper's TL;DR run) or `--preset tiny` (a CPU: the README's quick start).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# plumbing/: what the loop leans on, none of the algorithm (devices, N processes, data, files, console): `# ---` lines
from plumbing import checkpoints, devices, distributed, flag_ranges, reporting
from plumbing.data import RMView, pad_left, pad_token_id, rm_inputs, step_prompt_indices
from plumbing.devices import HostRows, Runtime

# ---- Settings: the paper's TL;DR run (§5). Help, ranges, checks: launch/flags.py, plumbing/flag_ranges.py ----------


@dataclass
class R2MConfig:
    # --- the algorithm -------------------------------------------------------------------------------
    algo: str = "rloo"  # advantage estimator: a row of ALGOS (Eq. 1 RLOO, GRPO; baselines.py adds ReMax, REINFORCE++)
    reward: str = "r2m"  # reward mode: a row of REWARD_MODES (vanilla, r2m, ablations; baselines.py, brme.py add more)
    total_trajectories: int = 1_000_000  # (query, response) pairs in the run: T = this / (n·K) steps
    queries_per_step: int = 2048  # n
    group_size: int = 4  # K responses per query
    max_new_tokens: int = 50
    temperature: float = 0.7  # Choice: sampling temperature (no top-k / top-p)
    policy_lr: float = 3e-6
    lr_schedule: str = "linear"  # Choice: decay to 0 over T ('constant' keeps it)
    policy_epochs: int = 2  # k: Choice, as the paper's dialogue runs
    policy_minibatch_size: int = 512  # Choice: trajectories per optimiser step (16 a step at n·K = 8192)
    clip_eps: float = 0.2  # ε of Eq. 2 (Choice)
    beta: float = 0.05  # β of Eq. 2 (Choice)
    max_grad_norm: float = 1.0
    missing_eos_penalty: Optional[float] = None  # Choice (TL;DR convention, off): the reward of a response without EOS
    omega_floor: float = 0.6  # Ω of Eq. 4
    alpha: float = 0.3  # α of Eq. 7 (0: w/o GRE, 1: w/o BT)
    d_attn: int = 2048  # d of Eq. 3
    rm_lr: float = 5e-7
    rm_minibatch_groups: int = 32  # Choice: groups per GREBT optimiser step
    rm_epochs: int = 1  # GREBT passes over a step's groups (the paper: one update)
    grebt_pairs: str = "fresh"  # Choice: GREBT's pairs from the rewards recomputed with h' ('annotated': at annotation)
    pretrain_rm_preference_file: Optional[str] = None  # the Pretrained RM baseline's pairs (App. G.5) ...
    pretrain_rm_epochs: int = 1
    pretrain_rm_lr: float = 1e-6
    pretrain_rm_batch_size: int = 8
    brme_heads: int = 5  # BRME (brme.py) ...
    brme_lambda: float = 0.4
    brme_preference_file: Optional[str] = None
    brme_epochs: int = 2
    brme_lr: float = 1e-4
    brme_sigma_prior: float = 0.01
    # --- the run -------------------------------------------------------------------------------------
    generation_batch_size: int = 120  # Choice: the most (<= 128, a multiple of 8) the memory plan fits with 10 GiB free
    forward_batch_size: int = 32  # sequences per no-grad forward (old/ref log-probs, RM annotation)
    micro_batch_size: int = 8  # sequences per policy forward/backward
    bf16: Optional[bool] = None  # bf16 frozen models and autocast, float32 masters (default: on for CUDA)
    gradient_checkpointing: Optional[bool] = None  # recompute the policy's activations (default: on for CUDA)
    checkpoint_layers: int = 1  # ... of that many of its layers when on by default (-1: all); Choice: the plan's fewest
    cache_weight_casts: bool = True  # with --bf16, a minibatch's micro-batches share one bf16 cast of each weight
    device: str = "auto"
    seed: int = 0
    output_dir: str = "runs/r2m"
    save_every: int = 20  # checkpoint every N steps and at the end (0: never)
    sample_every: int = 10  # print a few (prompt, response, reward) every N steps (0: never)
    resume: bool = False
    overwrite: bool = False
    max_nonfinite_steps: int = 3  # steps in a row with a non-finite value that stop the run
    merge_on_save: bool = False  # LoRA: checkpoints also hold the merged policy

    @property
    def trajectories_per_step(self) -> int:
        return self.queries_per_step * self.group_size

    @property
    def total_steps(self) -> int:
        return self.total_trajectories // self.trajectories_per_step

    def validate(self) -> None:  # a ValueError saying what to change, for a setting that cannot work
        flag_ranges.check_config(self, ALGOS, REWARD_MODES)


# ---- The policy's hidden states h (Algorithm 1: captured while computing π_old's log-probs, no extra pass) ---------


class HiddenStateCapture:
    """The policy's last-layer hidden states from a forward the loop makes anyway: a hook on its backbone, whose output
    is the last hidden state (after the final norm) at every position, in any Hugging Face causal LM (the LM head
    sees fewer: logits are computed only where read). `with HiddenStateCapture(policy) as c: policy(ids)`, then
    `c.pop()` -> h (B, S, D_p), detached."""

    def __init__(self, policy: nn.Module, enabled: bool = True):
        self.policy, self.enabled = policy, enabled
        self.hidden: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.hidden = output[0].detach()  # (B, S, D_p): last_hidden_state

    def pop(self) -> torch.Tensor:
        """(B, S, D_p), our reference dropped (under autocast a float32 copy that would stay on the GPU for nothing)."""
        hidden, self.hidden = self.hidden, None
        return hidden

    def __enter__(self) -> "HiddenStateCapture":
        if self.enabled:
            self._handle = self.policy.get_decoder().register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ---- Eq. 3: the sequence-to-token cross-attention from the RM's reward-token embedding to the policy's h -----------


class PolicyFeedbackAttention(nn.Module):
    """One query from the RM, keys and values from the policy: policy and RM may differ (sizes, tokenizers), nothing
    aligns the two sequences token by token. Choice: single head, no biases (as Eq. 3 is written); PyTorch's default
    init (the paper reports that the untrained module hurts, which a zero init would hide)."""

    def __init__(self, d_rm: int, d_policy: int, d_attn: int):
        super().__init__()
        self.d_attn = d_attn
        self.W_q = nn.Linear(d_rm, d_attn, bias=False)
        self.W_k = nn.Linear(d_policy, d_attn, bias=False)
        self.W_v = nn.Linear(d_policy, d_attn, bias=False)
        self.W_o = nn.Linear(d_attn, d_rm, bias=False)

    def forward(self, h_last: torch.Tensor, h: torch.Tensor, h_mask: torch.Tensor) -> torch.Tensor:
        """h_last (B, D_rm), h (B, S, D_p), h_mask (B, S) bool (True = real) -> Ĥ (B, D_rm)."""
        h = h.to(self.W_k.weight.dtype)
        # Eq. 3: q = H_last W_q, k = h W_k, v = h W_v, Ĥ = softmax(q kᵀ / sqrt(d)) v W_o
        q = self.W_q(h_last.to(self.W_q.weight.dtype))  # (B, d)
        k = self.W_k(h)  # (B, S, d)
        v = self.W_v(h)  # (B, S, d)
        scores = torch.einsum("bd,bsd->bs", q, k) / math.sqrt(self.d_attn)  # (B, S)
        scores = scores.masked_fill(~h_mask, float("-inf"))  # padding and post-EOS positions get no weight
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # (B, S)
        attended = torch.einsum("bs,bsd->bd", weights, v)  # (B, d)
        return self.W_o(attended)  # (B, D_rm)


# ---- Eq. 4: the schedule ω(t), and the R2M reward model r_φ(x, y, h) -----------------------------------------------


def omega(t: int, total_steps: int, floor: float) -> float:
    """Weight of the RM's own reward-token embedding at step t of T.
    Choice: t counts from 0 (Algorithm 1 counts 1..T), so the first step is scored by the pure semantic RM and the
    floor is reached at the same step in either reading; the two differ by at most ≈ 0.013 at T = 122."""
    # Eq. 4: ω(t) = max(½·cos(π·t/T) + ½, Ω)
    return max(0.5 * math.cos(math.pi * t / total_steps) + 0.5, floor)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S). With left padding the first real token must get position 0, as generate() gives it."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B,): the last real token, whatever the padding side.
    Choice: found from the mask, not from pad ids, so an EOS that doubles as the pad token still counts."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (S,)
    return (positions * attention_mask.long()).argmax(dim=1)


class FrozenRewardBody(nn.Module):
    """A pretrained scalar RM (a Hugging Face `*ForSequenceClassification` with one label) whose LLM body stays
    frozen; subclasses put their own heads on its reward-token embedding H_last (R2M here, BRME in brme.py)."""

    def __init__(self, reward_model: nn.Module):
        super().__init__()
        if not isinstance(getattr(reward_model, "score", None), nn.Linear) or reward_model.score.out_features != 1:
            raise ValueError(f"{type(reward_model).__name__} is not a scalar *ForSequenceClassification reward model "
                             "(expected a `score` Linear head with one output)")
        reward_model.requires_grad_(False)
        self.reward_model = reward_model

    def reward_token_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grad: bool = False):
        """(B, S), (B, S) -> H_last (B, D_rm), the last real token's last hidden state (gradients: only with `grad`)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = self.reward_model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state  # (B, S, D_rm)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]

    def rewards_from_embedding(self, h_last, h=None, h_mask=None, omega: float = 1.0) -> torch.Tensor:
        """H_last (B, D_rm), h (B, S, D_p) or None, h_mask (B, S), ω -> rewards (B,): each subclass's heads."""
        raise NotImplementedError

    def reward_parts(self, h_last, h=None, h_mask=None, omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rewards (B,), the part of them the policy's feedback carries (B,)): none, unless a subclass says."""
        rewards = self.rewards_from_embedding(h_last, h, h_mask, omega)
        return rewards, torch.zeros_like(rewards)

    def forward(self, input_ids, attention_mask, h=None, h_mask=None, omega: float = 1.0) -> torch.Tensor:
        """(B, S), (B, S), h (B, S_p, D_p), h_mask (B, S_p), ω -> rewards (B,)."""
        return self.rewards_from_embedding(self.reward_token_embedding(input_ids, attention_mask), h, h_mask, omega)


class R2MRewardModel(FrozenRewardBody):
    """r_φ(x, y, h): the frozen RM plus the policy-feedback path. Trainable: the cross-attention (W_q, W_k, W_v, W_o)
    and the score head φ, a float32 copy of the RM's own, so at ω = 1 R2M gives exactly the RM's own reward."""

    def __init__(self, reward_model: nn.Module, d_policy: int, d_attn: int = 2048, seed: int = 0):
        super().__init__(reward_model)
        d_rm = reward_model.score.in_features
        # Choice: the head's initial weights are a function of `seed` alone (a private generator state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy_feedback = PolicyFeedbackAttention(d_rm, d_policy, d_attn).float()
            self.score_head = nn.Linear(d_rm, 1, bias=reward_model.score.bias is not None).float()
        self.score_head.load_state_dict({k: v.float() for k, v in reward_model.score.state_dict().items()})

    def reward_parts(self, h_last, h=None, h_mask=None, omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """h_last (B, D_rm), h (B, S, D_p) or None, h_mask (B, S) -> (rewards (B,), their feedback part (B,)).
        φ is linear, so the reward splits along Eq. 4: φ(H_fin) = (1 - ω)·w·Ĥ + ω·w·H_last + b."""
        # Choice: rewards in float32 even when the body ran in bf16 (its ≈ 0.016 steps at |r| ≈ 3 reorder a group)
        with devices.float32_only(h_last):
            h_last = h_last.float()
            if h is None or omega == 1.0:  # no feedback (vanilla, iterative head), or ω = 1: H_fin = H_last
                return self.score_head(h_last).squeeze(-1), torch.zeros(h_last.shape[0], device=h_last.device)
            feedback = self.policy_feedback(h_last, h, h_mask)  # (B, D_rm) Ĥ, Eq. 3
            # Eq. 4: H_fin = (1 - ω(t))·Ĥ + ω(t)·H_last, reward = φ(H_fin)
            final = (1 - omega) * feedback + omega * h_last
            return self.score_head(final).squeeze(-1), (1 - omega) * (feedback @ self.score_head.weight[0])

    def rewards_from_embedding(self, h_last, h=None, h_mask=None, omega: float = 1.0) -> torch.Tensor:
        """(B, D_rm), h (B, S, D_p) or None, h_mask (B, S) -> (B,) rewards φ(H_fin), in float32."""
        return self.reward_parts(h_last, h, h_mask, omega)[0]

    def trainable_parameters(self, feedback: bool = True):
        """What GREBT trains: the cross-attention (unless the mode uses no feedback) and the score head."""
        if feedback:
            yield from self.policy_feedback.parameters()
        yield from self.score_head.parameters()

    def update_passes(self, groups: torch.Tensor, cfg: R2MConfig) -> list[torch.Tensor]:
        """A GREBT minibatch's groups in the passes that compute their rewards: one (no RM forward runs here)."""
        return [groups]

    def update_embedding(self, trajectories: "Rollout", rows: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        """H_last of `rows` (b, D_rm) for GREBT. Choice: the body is frozen: annotation's is exact (no RM forward)."""
        return trajectories.reward_token_embedding[rows.to(trajectories.reward_token_embedding.device)]

    @classmethod
    def build(cls, rm: nn.Module, cfg: R2MConfig, d_policy: int) -> "R2MRewardModel":
        return cls(rm, d_policy=d_policy, d_attn=cfg.d_attn, seed=cfg.seed)



# --- checkpoints: what one keeps of an R2M reward model (its heads; its body, if trained: baselines.py) ---
R2MRewardModel.save_body = False
R2MRewardModel.trainable_state_dict = checkpoints.heads_state_dict
R2MRewardModel.load_trainable_state_dict = checkpoints.load_heads_state_dict


# ---- Algorithm 1, steps 1-2: sampling K responses per query (π_old = π_θ), and reward annotation -------------------


@dataclass
class Rollout:
    """One step's trajectories, N = n·K: group i (prompt i) is rows i·K .. i·K + K - 1."""

    query_responses: torch.Tensor  # (N, P + R) policy tokens: prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (N, P + R) 1 on real tokens (the prompt, the response up to EOS)
    response_mask: torch.Tensor  # (N, R) 1 on response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (N, R) log π_old of the sampled tokens (temperature-scaled)
    ref_logprobs: torch.Tensor  # (N, R) log π_ref of the same tokens
    hidden: Optional[HostRows]  # h in host memory, row i (p_i + r_i - 1, D_p): its positions that predict a real
    # token (devices.HostRows); None without feedback
    rm_input_ids: torch.Tensor  # (N, S_rm) the RM's view: these ids with a shared tokenizer, else its own, right-padded
    rm_attention_mask: torch.Tensor  # (N, S_rm)
    contains_eos: torch.Tensor  # (N,) bool
    prompt_len: int  # P
    reward_token_embedding: Optional[torch.Tensor] = None  # (N, D_rm) H_last, from annotation
    reward_from_feedback: Optional[torch.Tensor] = None  # (N,) the part of each reward the feedback carries


def hidden_state_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S-1) bool: position s is kept when tokens s and s+1 are both real, i.e. its output predicts a
    real next token (the S - 1 positions of h; padding and what follows EOS are dropped)."""
    return (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """responses (B, R) -> (responses padded after the first EOS, mask (B, R): 1 up to and including EOS)."""
    R = responses.shape[1]
    is_eos = responses == eos_id  # (B, R)
    no_eos = torch.full_like(is_eos[:, 0], R, dtype=torch.long)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), no_eos)  # (B,), R when there is none
    mask = torch.arange(R, device=responses.device)[None, :] <= first_eos[:, None]  # (B, R)
    return responses.masked_fill(~mask, pad_id), mask.long()


def window(attention_mask: torch.Tensor) -> slice:
    """(b, S) CPU mask -> the columns where some row is real: the batch cut to its own longest row, either padding."""
    real = attention_mask.any(dim=0).nonzero()
    return slice(int(real[0]), int(real[-1]) + 1)


LOGPROB_CHUNK_ELEMENTS = 2**27  # float32 logits per chunk in sequence_logprobs: 512 MiB


def sequence_logprobs(model: nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float) -> torch.Tensor:
    """(B, P+R) -> (B, R): log-probabilities of the response tokens under `model` at `temperature`."""
    R = query_responses.shape[1] - prompt_len
    # Logits at position s predict token s+1: the response tokens P..P+R-1 are predicted by positions P-1..P+R-2, so
    # the LM head runs on the last R+1 positions only, the very last dropped (none on the prompt: nobody reads them).
    logits = model(input_ids=query_responses, attention_mask=attention_mask, use_cache=False, logits_to_keep=R + 1,
                   position_ids=position_ids_from_mask(attention_mask)).logits[:, :-1]  # (B, R, V), bf16 under autocast
    targets = query_responses[:, prompt_len:]  # (B, R)
    # Choice: log p = logit - logsumexp(logits) in float32, a few positions at a time (recomputed in backward), never
    # one float32 log-softmax over every position's vocabulary (2.5 GB for 8 x 512 positions of Qwen's 151,936).
    chunk = max(1, LOGPROB_CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[2]))  # positions per chunk
    pieces = [torch.utils.checkpoint.checkpoint(_token_logprobs, lg, tg, temperature, use_reentrant=False)
              if torch.is_grad_enabled() else _token_logprobs(lg, tg, temperature)
              for lg, tg in zip(logits.split(chunk, dim=1), targets.split(chunk, dim=1))]
    return torch.cat(pieces, dim=1)  # (B, R)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, c, V), (B, c) -> (B, c). Divided by the sampling temperature: the log-probs of what was sampled from."""
    logits = logits.float() / temperature  # (B, c, V)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)


def generate_responses(policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, tokenizer,
                       cfg: R2MConfig, runtime: Runtime, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """query_ids, query_mask (N, P) left-padded -> responses (N, R) padded after the first EOS, and their mask (N, R).
    Temperature sampling and nothing else (top_k=0 turns off transformers' default of 50), so the log-probs computed
    afterwards are those of the distribution sampled; greedy decoding for ReMax's baseline (baselines.py)."""
    from transformers import GenerationConfig

    R = cfg.max_new_tokens
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    sampling = dict(do_sample=False) if greedy else \
        dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    config = GenerationConfig(**sampling, max_new_tokens=R, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True)
    responses = []
    for rows in torch.arange(len(query_ids)).split(cfg.generation_batch_size):
        prompt = window(query_mask[rows])  # the batch's own longest prompt
        ids, mask = query_ids[rows, prompt].to(runtime.device), query_mask[rows, prompt].to(runtime.device)
        with devices.generating(policy, runtime):  # --- bf16 weights, none of the model's own settings; FSDP once ---
            out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        response = out[:, ids.shape[1] :]  # (b, R') with R' <= R: generation stops once every row has hit EOS
        responses.append(F.pad(response, (0, R - response.shape[1]), value=pad_id).cpu())  # (b, R)
    return truncate_after_eos(torch.cat(responses), eos_id, pad_id)  # (N, R) each


@torch.no_grad()
def rollout(policy: nn.Module, ref_policy: nn.Module, tokenizer, prompts: list[list[int]],
            prompt_texts: Optional[list[str]], cfg: R2MConfig, runtime: Runtime, rm_view: Optional[RMView],
            rm_pad_id: int, capture_hidden: bool = True) -> Rollout:
    """1. K responses per prompt from π_old = π_θ, their old and reference log-probs, and the policy's h captured
    during the old-log-prob forward (no extra pass; skipped when the reward mode uses no feedback)."""
    policy.eval()
    queries = [p for p in prompts for _ in range(cfg.group_size)]  # each prompt K times: group i is rows iK..iK+K-1
    query_ids, query_mask = pad_left(queries, pad_token_id(tokenizer))  # (N, P)
    P = query_ids.shape[1]
    response_ids, response_mask = generate_responses(policy, query_ids, query_mask, tokenizer, cfg, runtime)  # (N, R)
    query_responses = torch.cat([query_ids, response_ids], dim=1)  # (N, P+R)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (N, P+R)
    # h in host memory, one row per trajectory: its real tokens but the last (which predicts nothing)
    lengths = attention_mask.sum(1) - 1  # (N,)
    hidden = HostRows.for_policy(lengths.tolist(), policy, runtime) if capture_hidden else None
    old, ref = torch.zeros(response_mask.shape), torch.zeros(response_mask.shape)  # (N, R)
    for rows in torch.arange(len(queries)).split(cfg.forward_batch_size):
        cols = window(attention_mask[rows])  # the batch cut to its own longest row
        batch = query_responses[rows, cols].to(runtime.device)
        batch_mask = attention_mask[rows, cols].to(runtime.device)
        P_b, R_b = P - cols.start, cols.stop - P  # its prompt and response widths
        with runtime.autocast(), HiddenStateCapture(policy, enabled=capture_hidden) as capture:
            old[rows, :R_b] = sequence_logprobs(policy, batch, batch_mask, P_b, cfg.temperature).cpu()  # (b, R_b)
        if capture_hidden:  # each row's own positions: those whose output predicts a real token
            hidden.scatter(rows, capture.pop(), hidden_state_mask(attention_mask[rows, cols]))
        with runtime.autocast():
            ref[rows, :R_b] = sequence_logprobs(ref_policy, batch, batch_mask, P_b, cfg.temperature).cpu()
    if capture_hidden:
        hidden.synchronize()
    row_texts = [prompt_texts[i // cfg.group_size] for i in range(len(queries))] if prompt_texts is not None else None
    rm_ids, rm_mask = rm_inputs(tokenizer, query_responses, attention_mask, response_ids, response_mask, row_texts,
                                rm_view, rm_pad_id)
    return Rollout(query_responses=query_responses, attention_mask=attention_mask, response_mask=response_mask,
                   old_logprobs=old, ref_logprobs=ref, hidden=hidden, rm_input_ids=rm_ids, rm_attention_mask=rm_mask,
                   contains_eos=(response_ids == tokenizer.eos_token_id).any(dim=1) & (response_mask.sum(1) > 0),
                   prompt_len=P)


def policy_states(trajectories: Rollout, rows: torch.Tensor, runtime: Runtime):
    """h of `rows` (b, L, D_p) on the device, each from position 0, and its mask (b, L); (None, None) without."""
    if trajectories.hidden is None:
        return None, None
    return trajectories.hidden.gather(rows, runtime.device)


@torch.no_grad()
def annotate_rewards(reward_model: FrozenRewardBody, trajectories: Rollout, omega_t: float, cfg: R2MConfig,
                     runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2. r_ij = r_φ(x_i, y_ij, h_ij) -> rewards (N,) on the CPU, H_last (N, D_rm) (kept on the device: the GREBT step
    reuses it) and the part of each reward the policy feedback carries (N,)."""
    rewards, parts, h_lasts = [], [], []
    N = trajectories.rm_input_ids.shape[0]
    for s in range(0, N, cfg.forward_batch_size):
        rows = torch.arange(s, min(s + cfg.forward_batch_size, N))
        cols = window(trajectories.rm_attention_mask[rows])  # the batch cut to its own longest row
        with runtime.autocast():
            h_last = reward_model.reward_token_embedding(trajectories.rm_input_ids[rows, cols].to(runtime.device),
                                                         trajectories.rm_attention_mask[rows, cols].to(runtime.device))
            h, h_mask = policy_states(trajectories, rows, runtime)  # (b, S, D_p), (b, S), or None
            r, part = reward_model.reward_parts(h_last, h, h_mask, omega_t)  # Eqs. 3-4: (b,), (b,)
        rewards.append(r.float().cpu())
        parts.append(part.float().cpu())
        h_lasts.append(h_last.float())
    return torch.cat(rewards), torch.cat(h_lasts), torch.cat(parts)


def with_missing_eos_penalty(rewards: torch.Tensor, contains_eos: torch.Tensor, cfg: R2MConfig) -> torch.Tensor:
    """(N,) -> (N,). Choice (TL;DR convention, off by default): a response without EOS gets --missing_eos_penalty as
    its reward for the policy; GREBT's pseudo-labels stay the RM's own rewards."""
    if cfg.missing_eos_penalty is None:
        return rewards
    return torch.where(contains_eos, rewards, torch.full_like(rewards, cfg.missing_eos_penalty))


# ---- Algorithm 1, steps 3-4: advantages (Eq. 1 RLOO, GRPO) and the policy update (Eq. 2) ---------------------------


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(n, K) -> (n, K). Eq. 1: A_ij = r_ij - mean_{j' != j} r_ij'."""
    K = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)  # (n, K)
    return rewards - leave_one_out_mean


def group_std(rewards: torch.Tensor, correction: int) -> torch.Tensor:
    """(n, K) -> (n, 1), dividing by K - correction; clamped under the root so equal rewards have finite gradients."""
    return rewards.var(dim=1, keepdim=True, correction=correction).clamp_min(1e-24).sqrt()


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(n, K) -> (n, K). GRPO: A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps).
    Choice: the sample std (K - 1), as TRL and OpenRLHF implement GRPO; the paper takes GRPO as given."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (group_std(rewards, correction=1) + eps)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
                beta: float) -> tuple[torch.Tensor, dict]:
    """Eq. 2, negated for gradient descent. logprobs, old_logprobs, ref_logprobs (B, T): the sampled tokens under
    π_θ, π_old, π_ref; advantages (B,) one per response or (B, T) one per token; mask (B, T): 1 up to EOS."""
    mask = mask.bool()
    # Eq. 2: ρ = π_θ / π_old, surrogate = min(ρ·A, clip(ρ, 1-ε, 1+ε)·A).
    # Choice: ρ per token, as PPO / GRPO implementations do; the paper's sequence-level ratio (a product of 50-500
    # token ratios) would be clipped almost always.
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    # Eq. 2: per-token KL(π_θ || π_ref), k3 estimator exp(q - p) - (q - p) - 1, p = log π_θ, q = log π_ref
    log_ratio_ref = ref_logprobs - logprobs  # (B, T)
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # (B, T), >= 0
    per_token = -(surrogate - beta * kl)  # (B, T)
    # Choice: mean over each response's tokens, then over responses. `where`, not a product: a padded position may
    # hold an overflowing ratio, and inf·0 = NaN.
    lengths = mask.sum(dim=1).clamp_min(1)  # (B,)
    masked_mean = lambda x: (torch.where(mask, x, 0.0).sum(dim=1) / lengths)  # noqa: E731  (B, T) -> (B,)
    loss = masked_mean(per_token).mean()
    with torch.no_grad():  # 0-d tensors, left on the device: summed there, read once a step
        stats = {"policy/loss": loss.detach(), "policy/kl_k3": masked_mean(kl).mean(),
                 "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float()).mean(),
                 "policy/ratio": masked_mean(ratio).mean()}
    return loss, stats


def policy_update(policy: nn.Module, optimizer: torch.optim.Optimizer, trajectories: Rollout,
                  advantages: torch.Tensor, cfg: R2MConfig, runtime: Runtime) -> dict:
    """4. k epochs of Eq. 2 over the step's trajectories in minibatches; advantages (N,) or (N, R). The LAST epoch's
    forwards also capture fresh h' (same hook, no extra pass) into trajectories.hidden, for the RM step (if any)."""
    policy.train()  # only for gradient checkpointing: dropout was switched off at start-up
    N, P = trajectories.query_responses.shape[0], trajectories.prompt_len
    accumulation = cfg.policy_minibatch_size // cfg.micro_batch_size
    beta = cfg.beta if ALGOS[cfg.algo].kl_in_loss else 0.0
    lengths = trajectories.attention_mask.sum(1)  # (N,) real tokens per row
    sums, micro_batches, minibatches = {}, 0, 0  # the statistics, summed on the device
    for epoch in range(cfg.policy_epochs):
        refresh = epoch == cfg.policy_epochs - 1 and trajectories.hidden is not None
        order = torch.randperm(N)
        for start in range(0, N, cfg.policy_minibatch_size):
            minibatch = order[start : start + cfg.policy_minibatch_size]
            # Choice: a minibatch's rows in order of length, so each micro-batch is cut to its own longest row (the
            # summed update is the same), and its forwards share one bf16 cast of each weight (`cached_casts`)
            minibatch = minibatch[lengths[minibatch].argsort(descending=True, stable=True)]
            optimizer.zero_grad(set_to_none=True)
            with runtime.cached_casts():
                for rows in minibatch.split(cfg.micro_batch_size):
                    cols = window(trajectories.attention_mask[rows])  # P_b + R_b of the P + R columns
                    ids, mask = trajectories.query_responses[rows, cols], trajectories.attention_mask[rows, cols]
                    take = lambda x: (x[rows] if x.dim() == 1 else x[rows, : cols.stop - P]).to(runtime.device)  # noqa
                    with HiddenStateCapture(policy, enabled=refresh) as capture:
                        logprobs = sequence_logprobs(policy, ids.to(runtime.device), mask.to(runtime.device),
                                                     P - cols.start, cfg.temperature)  # (b, R_b)
                    if refresh:  # copied out before backward, so the float32 states are not held through it
                        trajectories.hidden.scatter(rows, capture.pop(), hidden_state_mask(mask))
                    with runtime.no_autocast():
                        loss, s = policy_loss(logprobs, take(trajectories.old_logprobs),
                                              take(trajectories.ref_logprobs), take(advantages),
                                              take(trajectories.response_mask), cfg.clip_eps, beta)
                        (loss / accumulation).backward()  # micro-batches of one size: the exact minibatch mean
                    sums = {**sums, **{k: sums.get(k, 0.0) + v for k, v in s.items()}}
                    micro_batches += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            sums["policy/grad_norm"], minibatches = sums.get("policy/grad_norm", 0.0) + grad_norm, minibatches + 1
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # Choice: no gradients kept on the GPU through the next step's phases
    if trajectories.hidden is not None:
        trajectories.hidden.synchronize()
    # the step's one read of its statistics: means over micro-batches (over optimiser steps for the norm)
    return {k: float(v) / (minibatches if k == "policy/grad_norm" else micro_batches) for k, v in sums.items()}


# ---- Algorithm 1, step 5: the reward model's update with GREBT (Eqs. 5-7) ------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> (). Eq. 5: L_BT = -log σ(r_w - r_l), mean over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def group_reward_entropy(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n, K) -> (). Eq. 6, mean over groups, with the population std (divide by K) of Appendix A (Defs. A.9-A.10).
    Choice: gradients flow through the mean and the std, as the equation is written."""
    K = rewards.shape[1]
    # Eq. 6: z = (r - mean(r)) / (std(r) + eps), p = softmax(z), L_GRE = -Σ_j p_j log p_j
    z = (rewards - rewards.mean(dim=1, keepdim=True)) / (group_std(rewards, correction=0) + eps)  # (n, K)
    log_p = F.log_softmax(z, dim=1)  # (n, K)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # (n,)
    # Choice: a group of K equal rewards sits at the maximum log K, where the gradient is zero; pinned to the constant
    # so that rounding in mean / std, amplified by 1/eps, cannot turn that zero into noise.
    degenerate = (rewards == rewards[:, :1]).all(dim=1)  # (n,)
    return torch.where(degenerate, torch.full_like(entropy, math.log(K)), entropy).mean()


def grebt_pair(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) -> winner (n, 1), loser (n, 1): each group's self-labelled pair, its highest and lowest reward."""
    return rewards.argmax(dim=1, keepdim=True), rewards.argmin(dim=1, keepdim=True)


def grebt_loss(new_rewards: torch.Tensor, pair_rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """(n, K), (n, K) -> (). Eq. 7: L_GREBT = (1 - α)·L_BT + α·L_GRE, averaged over groups. The pair is chosen by
    `pair_rewards` (no gradient through the choice); both terms are computed on `new_rewards`."""
    winner, loser = grebt_pair(pair_rewards.detach())  # (n, 1) each
    r_w, r_l = new_rewards.gather(1, winner).squeeze(1), new_rewards.gather(1, loser).squeeze(1)  # (n,) each
    return (1 - alpha) * bradley_terry_loss(r_w, r_l) + alpha * group_reward_entropy(new_rewards)  # Eq. 7


def reward_model_update(reward_model: R2MRewardModel, optimizer: torch.optim.Optimizer, trajectories: Rollout,
                        annotated: torch.Tensor, omega_t: float, mode: "RewardMode", cfg: R2MConfig,
                        runtime: Runtime) -> dict:
    """5. --rm_epochs passes (the paper: one) of GREBT over the step's groups in minibatches. annotated (n, K): the
    annotation's rewards. The rewards are recomputed with the current φ and cross-attention, from H_last and the
    fresh h' of the last policy epoch, at this step's ω; both loss terms use them.
    Choice: which rewards pick the (winner, loser) pair. `--grebt_pairs fresh` (default): the recomputed ones, as
    Fig. 3's caption ("use real-time feedback h' to construct preference pairs"), §5.1(3) and App. G.5 read (G.5's
    Iterative RM_Head is the variant that keeps the annotation's); 'annotated': Algorithm 1's lines taken literally."""
    K, n = cfg.group_size, annotated.shape[0]
    use_annotated = mode.annotated_pairs or cfg.grebt_pairs == "annotated"
    totals, batches = {"rm/grebt": 0.0, "rm/bt": 0.0, "rm/gre": 0.0}, 0
    for _ in range(cfg.rm_epochs):
        for groups in torch.randperm(n).split(cfg.rm_minibatch_groups):
            optimizer.zero_grad(set_to_none=True)
            for part in reward_model.update_passes(groups, cfg):  # R2M: the minibatch in one pass
                rows = (part[:, None] * K + torch.arange(K)[None, :]).reshape(-1)  # (g·K,) these groups' rows
                h, h_mask = policy_states(trajectories, rows, runtime) if mode.sees_policy else (None, None)  # fresh h'
                with runtime.autocast():
                    h_last = reward_model.update_embedding(trajectories, rows, runtime)  # (g·K, D_rm)
                    new = reward_model.rewards_from_embedding(h_last, h, h_mask, omega_t).view(len(part), K)  # (g, K)
                pair_rewards = annotated[part].to(new.device) if use_annotated else new.detach()  # (g, K)
                weight = len(part) / len(groups)  # Eq. 7 averages over groups: a pass counts by its share
                loss = grebt_loss(new, pair_rewards, cfg.alpha) * weight
                loss.backward()
                with torch.no_grad():  # summed on the device, read once a step
                    w, l = grebt_pair(pair_rewards)
                    r_w, r_l = new.gather(1, w).squeeze(1), new.gather(1, l).squeeze(1)  # (g,) each
                    totals["rm/bt"] += weight * bradley_terry_loss(r_w, r_l)
                    totals["rm/gre"] += weight * group_reward_entropy(new)
                    totals["rm/grebt"] += loss.detach()
            distributed.average_gradients(reward_model.parameters())  # --- distributed: replicated head ---
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            batches += 1
    optimizer.zero_grad(set_to_none=True)  # as the policy's: no gradients kept until the next step
    return {k: float(v) / batches for k, v in totals.items()}


# ---- The variants: each estimator and reward mode is one row, chosen here and nowhere else -------------------------


@dataclass(frozen=True)
class Algo:
    """An advantage estimator (step 3). The rest of the step is the same for every one: the clipped surrogate of
    Eq. 2, as the paper writes it for both RLOO and GRPO (a Choice for the baselines)."""

    advantages: Callable  # (rewards (n, K), trajectories, baseline (n,) or None, cfg) -> (N,) or (N, R) per token
    min_group_size: int = 2  # leave-one-out / group std need K >= 2
    kl_in_loss: bool = True  # Eq. 2's β·KL term (off where the KL is in the reward already)
    baseline: Optional[Callable] = None  # ReMax: a reward per prompt, scored in step 1 (baselines.greedy_baseline)


ALGOS: dict[str, Algo] = {  # baselines.py adds "remax" and "reinforce_pp"
    "rloo": Algo(lambda rewards, *_: rloo_advantages(rewards).reshape(-1)),  # Eq. 1
    "grpo": Algo(lambda rewards, *_: grpo_advantages(rewards).reshape(-1)),
}


@dataclass(frozen=True)
class RewardMode:
    """How a reward mode uses the reward model; the step never branches on a mode's name."""

    sees_policy: bool  # the policy's h goes through the cross-attention (Eqs. 3-4)
    train: bool  # the GREBT step after every policy step (Eqs. 5-7)
    annotated_pairs: bool = False  # GREBT's pairs from the annotation's rewards, whatever --grebt_pairs says
    reward_model: type = R2MRewardModel  # the class built for it (`build`); the baselines' rows name their own
    fit_on: Optional[str] = None  # the flag of the preference file it is fitted on before RL (Pretrained RM, BRME)


REWARD_MODES: dict[str, RewardMode] = {  # the paper's ablations; baselines.py and brme.py add the other baselines
    "vanilla": RewardMode(sees_policy=False, train=False),
    "r2m": RewardMode(sees_policy=True, train=True),
    "r2m_frozen": RewardMode(sees_policy=True, train=False),  # R2M w/o train
    "iterative_head": RewardMode(sees_policy=False, train=True, annotated_pairs=True),  # App. G.5
}  # R2M w/o BT, w/o GRE: --alpha 1, --alpha 0


# ---- One RL step (Algorithm 1), and the loop -----------------------------------------------------------------------


def rl_step(step: int, policy: nn.Module, ref_policy: nn.Module, reward_model: FrozenRewardBody, tokenizer,
            prompts: list[list[int]], prompt_texts: Optional[list[str]], optimizers: dict, cfg: R2MConfig,
            runtime: Runtime, rm_view: Optional[RMView] = None,
            rm_pad_id: int = 0) -> tuple[dict, Rollout, torch.Tensor]:
    """Algorithm 1's step t on this process's n prompts (whole groups) -> its metrics, its trajectories and their
    rewards (N,). optimizers: {"policy": ..., "reward_model": ... (modes that train it)}."""
    mode, algo, K, n = REWARD_MODES[cfg.reward], ALGOS[cfg.algo], cfg.group_size, len(prompts)
    times = [time.perf_counter()]
    omega_t = omega(step, cfg.total_steps, cfg.omega_floor) if mode.sees_policy else 1.0  # Eq. 4
    # 1. π_old = π_θ samples K responses per prompt; old and reference log-probs; h captured on the way
    trajectories = rollout(policy, ref_policy, tokenizer, prompts, prompt_texts, cfg, runtime, rm_view, rm_pad_id,
                           capture_hidden=mode.sees_policy)
    baseline = algo.baseline(policy, reward_model, tokenizer, prompts, prompt_texts, omega_t, cfg, runtime, rm_view,
                             rm_pad_id) if algo.baseline else None  # ReMax: the greedy responses' rewards (n,)
    times.append(time.perf_counter())
    # 2. reward annotation, r = r_φ(x, y, h) (Eqs. 3-4), keeping H_last for step 5
    rm_rewards, trajectories.reward_token_embedding, trajectories.reward_from_feedback = annotate_rewards(
        reward_model, trajectories, omega_t, cfg, runtime)  # (N,), (N, D_rm), (N,)
    rewards = with_missing_eos_penalty(rm_rewards, trajectories.contains_eos, cfg)  # (N,)
    times.append(time.perf_counter())
    # 3. advantages within each group (Eq. 1: RLOO; GRPO)
    advantages = algo.advantages(rewards.view(n, K), trajectories, baseline, cfg)  # (N,) or (N, R)
    # 4. policy update (Eq. 2); its last epoch refreshes trajectories.hidden with h' for step 5
    stats = policy_update(policy, optimizers["policy"], trajectories, advantages, cfg, runtime)
    times.append(time.perf_counter())
    # 5. RM update: GREBT on the fresh h', at this step's ω (Eqs. 5-7)
    if mode.train:
        stats |= reward_model_update(reward_model, optimizers["reward_model"], trajectories, rm_rewards.view(n, K),
                                     omega_t, mode, cfg, runtime)
    times.append(time.perf_counter())
    record = reporting.step_record(step, omega_t, rewards, rm_rewards, baseline, trajectories, K, stats, times)
    return record, trajectories, rewards


def train(policy: nn.Module, ref_policy: nn.Module, reward_model: FrozenRewardBody, tokenizer,
          prompts: list[list[int]], cfg: R2MConfig, prompt_texts: Optional[list[str]] = None,
          rm_view: Optional[RMView] = None, rm_pad_id: int = 0, on_step: Optional[Callable] = None, tracker=None,
          preferences: Optional[tuple] = None) -> list[dict]:
    """Algorithm 1 for cfg.total_steps steps -> the steps' metrics (also in output_dir/metrics.jsonl).

    policy, ref_policy: Hugging Face causal LMs (the same weights at the start); reward_model: built for the reward
    mode (`REWARD_MODES[cfg.reward].reward_model.build`); tokenizer: the policy's; prompts: token ids; prompt_texts:
    the raw prompts (needed when the RM has its own tokenizer: rm_view, `plumbing.data.make_rm_view`).
    on_step(step, trajectories, rewards) -> extra metrics for the step; tracker: `launch/tracking.py`;
    preferences: chosen (ids, mask), rejected (ids, mask) in the RM's view, (M, S) each, for the modes fitted on
    preference pairs before RL."""
    cfg.validate()
    mode = REWARD_MODES[cfg.reward]
    if not prompts or (rm_view is not None and (prompt_texts is None or len(prompt_texts) != len(prompts))):
        raise ValueError("no prompts to train on" if not prompts else "an RM with its own tokenizer needs prompt_texts")
    if not isinstance(reward_model, mode.reward_model):
        raise ValueError(f"--reward {cfg.reward} needs a reward model of class {mode.reward_model.__name__}, not "
                         f"{type(reward_model).__name__} (REWARD_MODES[{cfg.reward!r}].reward_model.build makes one)")
    resuming = cfg.resume and checkpoints.has_checkpoint(cfg.output_dir)
    if mode.fit_on and not resuming and preferences is None:
        raise ValueError(f"--reward {cfg.reward} is fitted on preference pairs before RL: pass preferences")
    # --- distributed: each of N processes runs this loop on n/N of a step's prompts (rank_cfg: its share) ---
    rank, world_size = distributed.rank_and_world_size()
    rank_cfg = distributed.per_rank_config(cfg, world_size, mode.reward_model)
    devices.seed_everything(cfg.seed + rank)  # --- seeding: each process samples its own responses ---
    runtime = devices.make_runtime(cfg)  # --- device and precision; the models placed (FSDP2 under torchrun) ---
    devices.prepare_models(policy, ref_policy, reward_model, runtime,
                           fine_tune_body=getattr(reward_model, "fine_tunes_body", False) and not resuming)
    distributed.place_models(policy, ref_policy, reward_model, runtime.device, runtime.autocast_dtype is not None)
    optimizers, schedulers = make_optimizers(policy, reward_model, mode, cfg, runtime)
    at_start = [p.detach().clone() for p in reward_model.policy_feedback.parameters()] if mode.sees_policy else None
    # --- resume: the newest complete checkpoint, or a fresh run; metrics.jsonl started or cut to the checkpoint ---
    start, metrics = checkpoints.start_run(cfg, policy, reward_model, optimizers, schedulers, resuming)
    if mode.fit_on and not resuming:  # the Pretrained RM's fine-tuning, or BRME's heads, before the first step
        distributed.print0(reward_model.fit_before_rl(*preferences, cfg=cfg, runtime=runtime))
    guarded = {k: checkpoints.SkipNonFiniteSteps(o) for k, o in optimizers.items()}  # --- non-finite: skipped ---
    nonfinite, history = checkpoints.NonFiniteStreak(cfg.max_nonfinite_steps), []
    bar = reporting.progress_bar(start, cfg.total_steps, f"{cfg.algo}+{cfg.reward}")
    for step in bar:
        n = rank_cfg.queries_per_step  # --- distributed: this process's whole groups ---
        chosen = step_prompt_indices(len(prompts), cfg.queries_per_step, step, cfg.seed)[rank * n : (rank + 1) * n]
        # Choice: the step's groups longest prompt first, so each batch of every phase holds rows of similar length and
        # is cut to its own longest (little padding); the first batch is the largest, so a step that fits does at once
        chosen = sorted(chosen, key=lambda i: -len(prompts[i]))
        batch = [prompts[i] for i in chosen]
        batch_texts = [prompt_texts[i] for i in chosen] if prompt_texts is not None else None
        trajectories = None  # the last step's h (GBs of host memory) goes before the next is sampled
        record, trajectories, rewards = rl_step(step, policy, ref_policy, reward_model, tokenizer, batch, batch_texts,
                                                guarded, rank_cfg, runtime, rm_view, rm_pad_id)
        checkpoints.step_schedulers(schedulers)  # once per RL step, skipped updates or not
        record |= reporting.cross_attention_change(reward_model, at_start)
        record["lr/policy"] = schedulers["policy"].get_last_lr()[0]
        record |= on_step(step, trajectories, rewards) if on_step is not None else {}
        record["nonfinite/skipped_updates"] = checkpoints.count_skipped(guarded)
        record = distributed.mean_over_ranks(record)  # --- distributed: one record for all ranks ---
        history.append(record)
        checkpoints.append_metrics(metrics, record)  # --- metrics.jsonl, the console, a tracker ---
        samples = reporting.show_step(bar, record, tokenizer, batch, trajectories, rewards, cfg.group_size,
                                      samples=bool(cfg.sample_every) and step % cfg.sample_every == 0)
        if tracker is not None:
            tracker.log(record, samples)
        # --- non-finite values: --max_nonfinite_steps steps in a row stop the run; a checkpoint every --save_every ---
        checkpoints.end_step(record, step, cfg, nonfinite, policy, tokenizer, reward_model, optimizers, schedulers)
    return history


def make_optimizers(policy: nn.Module, reward_model: FrozenRewardBody, mode: RewardMode, cfg: R2MConfig,
                    runtime: Runtime) -> tuple[dict, dict]:
    """Choice: AdamW without weight decay (fused on a GPU: no full-size temporaries), learning rates decaying
    linearly to 0 over T (--lr_schedule constant: fixed), stepped once per RL step -> optimisers, schedulers."""
    T, fused = cfg.total_steps, runtime.device.type == "cuda"
    decay = (lambda s: max(0.0, 1.0 - s / T)) if cfg.lr_schedule == "linear" else (lambda s: 1.0)  # noqa: E731
    optimizers = {"policy": torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr, weight_decay=0.0, fused=fused)}
    if mode.train:
        trained = list(reward_model.trainable_parameters(feedback=mode.sees_policy))
        optimizers["reward_model"] = torch.optim.AdamW(trained, lr=cfg.rm_lr, weight_decay=0.0, fused=fused)
    return optimizers, {k: torch.optim.lr_scheduler.LambdaLR(o, decay) for k, o in optimizers.items()}


@torch.no_grad()
def policy_hidden_states(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(B, S), (B, S) -> h (B, S-1, D_p), h_mask (B, S-1): the policy's feedback for sequences it did not just sample
    (evaluation, analysis); the loop captures h during forwards it makes anyway."""
    with HiddenStateCapture(policy) as capture:
        policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    return capture.hidden[:, :-1], hidden_state_mask(attention_mask)
