"""Where the loop's tensors live and in what precision: the device, bf16, the frozen models' dtypes, the step's
hidden states in host memory, the bf16 weights and the blank generation config the policy generates with, the
float32 reward heads, seeding, and the set-up every model gets before it is placed (`prepare_models`: dropout
off, dtypes, what trains). Plumbing of `r2m.train`: none of it changes what is computed, only where and in which
dtype; each decision is a "Choice:" below.

The same code runs on a GPU and on a CPU: `--bf16 true` on a CPU runs the GPU's dtype logic (bf16 frozen models,
bf16 autocast for what trains, float32 where the code says so) through CPU autocast, so tests can check it.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from plumbing import distributed


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def on_for_cuda(flag: Optional[bool], device: torch.device) -> bool:
    """A flag whose default (None) means: on for a CUDA device, off for a CPU; true / false as given."""
    return device.type == "cuda" if flag is None else bool(flag)


@dataclass
class Runtime:
    """Where things run. Built once in `r2m.train` from the config (`make_runtime`)."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype]  # bf16 with --bf16 (the default on CUDA), else None: float32 throughout
    gradient_checkpointing: bool = False  # recompute the policy's activations in backward (default on CUDA)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The reference policy's and the RM body's weights: bf16 with --bf16, else float32."""
        return self.autocast_dtype or torch.float32

    @property
    def hidden_dtype(self) -> torch.dtype:
        """The step's hidden states in host memory: bf16 with --bf16 (half the bytes), else float32."""
        return self.autocast_dtype or torch.float32

    @property
    def pin_memory(self) -> bool:
        """Host memory the GPU copies from and to is page-locked, so those copies are asynchronous."""
        return self.device.type == "cuda"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # Choice: no autocast weight cache. With it, every forward keeps a bf16 copy of all the policy's float32
        # weights until the autocast region ends (5.8 GiB for a 3B policy, 15 GiB for an 8B one); without it each
        # weight is cast when used and the copy freed with its layer (gradient checkpointing recasts in backward).
        # Same numbers; casting costs a read of the weights per forward, small beside the matmuls.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)


def make_runtime(cfg) -> Runtime:
    """cfg: anything with `device`, `bf16` and `gradient_checkpointing` (an `r2m.R2MConfig`)."""
    device = resolve_device(cfg.device)
    return Runtime(
        device=device,
        autocast_dtype=torch.bfloat16 if on_for_cuda(cfg.bf16, device) else None,
        gradient_checkpointing=on_for_cuda(cfg.gradient_checkpointing, device),
    )


def disable_dropout(model: nn.Module) -> None:
    """Choice: dropout off in every model. PPO's ratio π_θ/π_old must be exactly 1 before the first update.

    Not only `nn.Dropout` modules: Hugging Face attention layers keep their dropout rate as a plain float
    (GPT-NeoX's and Llama's `attention_dropout`) handed to the attention kernel in train mode, and some read
    it from the config at run time, so every float attribute named "*dropout*" of a module or a config is
    zeroed too."""

    def zero_dropout_floats(obj) -> None:
        for name, value in list(vars(obj).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(obj, name, 0.0)

    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        zero_dropout_floats(module)
        if hasattr(module, "config") and module.config is not None:
            for config in (module.config, *(getattr(module.config, k) for k in vars(module.config)
                                             if k.endswith("_config") and getattr(module.config, k) is not None)):
                if hasattr(config, "__dict__"):
                    zero_dropout_floats(config)


def cast_parameters(model: nn.Module, dtype: torch.dtype, only_frozen: bool = False) -> None:
    """Cast a model's parameters (or only those that do not train) to `dtype`, leaving its buffers as they are.

    Not `model.to(dtype)`: that casts buffers too, and the rotary position frequencies (`inv_freq` of GPT-NeoX,
    Llama, Qwen) are float32 buffers that `from_pretrained(dtype=torch.bfloat16)` keeps in float32. Rounded to
    bf16 they shift every position's rotation angle (Pythia at position 560: 0.19 rad; Llama-3's base 5e5: 1 rad),
    and the rotary forward's own `.float()` cannot undo the rounding: the frozen reference and RM would be
    other models than the ones trained."""
    for p in model.parameters():
        if p.dtype != dtype and p.is_floating_point() and not (only_frozen and p.requires_grad):
            p.data = p.data.to(dtype)


def checkpoint_activations(model: nn.Module, enabled: bool = True) -> None:
    """Recompute a Hugging Face model's layer activations in backward (in train mode), or stop doing so; through
    transformers' `activation_checkpointing_*` (named `gradient_checkpointing_*` before 5.x)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}  # the non-reentrant kind: works with frozen inputs and no_grad parts
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()


def prepare_models(policy: nn.Module, ref_policy: nn.Module, reward_model: nn.Module, rt: Runtime,
                   fine_tune_body: bool = False) -> None:
    """Dropout off, dtypes, what trains: done where the models were loaded, before they are placed on the device
    (moved whole, or FSDP-sharded across processes).

    Choice: the policy and the trainable reward-model parts are float32 master weights (under bf16 autocast with
    --bf16: a 3e-6 or 5e-7 step on a bf16 weight is mostly lost to rounding); the frozen reference policy and RM
    body are stored in bf16 with --bf16, their parameters only (`cast_parameters`: the rotary frequencies
    stay float32). fine_tune_body: the Pretrained-RM baseline trains the RM body before RL, in float32 until then."""
    for m in (policy, ref_policy, reward_model):
        disable_dropout(m)
    for p in policy.parameters():  # float32 masters; LoRA (plumbing/lora.py): the frozen base like the ref
        p.data = p.data.to(torch.float32 if p.requires_grad else rt.frozen_dtype)
    cast_parameters(ref_policy, rt.frozen_dtype)
    ref_policy.eval().requires_grad_(False)
    cast_parameters(reward_model.reward_model, torch.float32 if fine_tune_body else rt.frozen_dtype)
    reward_model.reward_model.eval()
    for module in reward_model.children():  # the heads that train (R2M's, BRME's): float32 masters
        if module is not reward_model.reward_model:
            cast_parameters(module, torch.float32)
    if rt.gradient_checkpointing:
        checkpoint_activations(policy)
        policy.config.use_cache = True  # generation still uses the KV cache (checkpointing only in train mode)
        if any(p.requires_grad for p in reward_model.reward_model.parameters()):  # a body that trains (whole RM)
            checkpoint_activations(reward_model.reward_model.train())


@contextlib.contextmanager
def generating(policy: nn.Module, rt: Runtime):
    """Everything `generate` runs under, in one context: autocast; under torchrun the policy gathered once for the
    whole call (`distributed.gathered_for_generation`); its bf16 generation weights (`generation_weights`); and
    none of its own generation settings (`own_generation_config`)."""
    with rt.autocast(), distributed.gathered_for_generation(policy), generation_weights(policy, rt.autocast_dtype), \
            own_generation_config(policy):
        yield


def float32_only(x: torch.Tensor):
    """Autocast off around the reward head (the cross-attention, the Eq. 4 blend and φ).
    Choice: rewards are computed in float32 even when the frozen bodies run in bf16. bf16 has ~3 significant
    digits (a step of ≈ 0.016 at |r| ≈ 3), enough to reorder a group's rewards, which moves RLOO advantages
    and GREBT's argmax / argmin pair."""
    return torch.autocast(x.device.type, enabled=False)


@contextlib.contextmanager
def own_generation_config(model: nn.Module):
    """Generate with only the settings we pass. transformers fills every generation field we leave unset
    from the model's own generation_config.json (Qwen2.5-Instruct ships repetition_penalty=1.05, others
    top_k / top_p / no_repeat_ngram_size ...): each would change the distribution sampled from without
    entering the log-probs that the PPO ratio divides by. So the model's config is swapped for a blank one
    while generating."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def generation_weights(policy: nn.Module, dtype: Optional[torch.dtype]):
    """Swap the policy's float32 master weights for a `dtype` copy while it generates, then put them back.

    Choice: with --bf16 the policy generates from bf16 weights. Under autocast alone its float32 residual stream
    makes the KV cache float32 (twice the bytes), and autocast keeps its own bf16 copy of every weight for the
    whole generate() call anyway. Swapping in a bf16 copy for generation only (about the same bytes as
    autocast's copy, freed afterwards) halves the KV cache. A second bf16 model kept for generation and
    refreshed after each update would cost those bytes in every phase, not just this one. Sampling is
    unchanged in what it draws from (temperature softmax of the policy's logits), up to bf16 rounding that
    the old log-probs, recomputed with the float32 masters, do not share (as with any KV-cache decode).
    Buffers (rotary frequencies) are not touched: they stay float32."""
    if dtype is None:
        yield
        return
    masters = [(p, p.data) for p in policy.parameters()]
    for p, master in masters:
        p.data = master.to(dtype)
    try:
        yield
    finally:
        for p, master in masters:
            p.data = master


# ----------------------------------------------------------------------------------------------------
# The step's hidden states in host memory
# ----------------------------------------------------------------------------------------------------

PINNED_CHUNK_BYTES = 2**28  # 256 MiB: a power of two, as the pinned-memory allocator hands out


def pinned_bytes(nbytes: int) -> int:
    """What PyTorch's pinned (page-locked) host-memory allocator reserves for an allocation of `nbytes`: it rounds
    every request up to a power of two and caches the block for reuse for the rest of the process."""
    return 1 << max(0, math.ceil(math.log2(max(nbytes, 1))))


class HostRows:
    """Rows of one shape (S, D), one per trajectory, in host memory: a step's policy hidden states h.

    Choice: where h lives. A TL;DR step holds 8192 trajectories x ~560 positions x 2560 features, ~23.5 GB in bf16,
    which does not fit on the GPU beside three 2.8B models and the policy's AdamW state, so it stays in host memory
    and moves to the GPU a micro-batch at a time. On a GPU run the memory is pinned, so both copies (the GPU writing
    rows after each forward, reading them for each RM and GREBT batch) are asynchronous. It is allocated once per
    step, in chunks of PINNED_CHUNK_BYTES (whole rows each): the pinned allocator rounds each allocation up to a power
    of two and keeps it, so one 23.5 GB buffer would reserve 32 GiB, and one piece per forward batch (91.9 MB at 32
    rows) 128 MiB each; 256 MiB chunks waste less than a row each and are reused by the next step's rollout.
    Rows are written (`scatter`) and read (`gather`) by index; nothing ever concatenates them into one tensor."""

    def __init__(self, rows: int, row_shape: Sequence[int], dtype: torch.dtype, pin: bool = False):
        self.rows, self.row_shape, self.dtype, self.pin = rows, tuple(row_shape), dtype, pin
        self.rows_per_chunk = self.chunk_rows(row_shape, dtype)
        self.chunks = [self._allocate(min(self.rows_per_chunk, rows - start))
                       for start in range(0, rows, self.rows_per_chunk)]

    @staticmethod
    def chunk_rows(row_shape: Sequence[int], dtype: torch.dtype) -> int:
        """Whole rows per chunk: as many as PINNED_CHUNK_BYTES holds (at least one)."""
        row_bytes = max(1, math.prod(row_shape) * torch.empty((), dtype=dtype).element_size())
        return max(1, PINNED_CHUNK_BYTES // row_bytes)

    @classmethod
    def reserved_bytes(cls, rows: int, row_shape: Sequence[int], dtype: torch.dtype) -> int:
        """Host memory that `rows` rows take when pinned: each chunk as the pinned allocator reserves it."""
        per_chunk = cls.chunk_rows(row_shape, dtype)
        row_bytes = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
        return sum(pinned_bytes(min(per_chunk, rows - start) * row_bytes) for start in range(0, rows, per_chunk))

    def _allocate(self, n: int) -> torch.Tensor:
        """One chunk of n rows, (n, *row_shape), uninitialised."""
        return torch.empty((n, *self.row_shape), dtype=self.dtype, pin_memory=self.pin)

    @classmethod
    def for_policy(cls, rows: int, positions: int, policy: nn.Module, rt: Runtime) -> "HostRows":
        """Host memory for `rows` trajectories' hidden states, (positions, D_p) each, in the run's hidden dtype."""
        d_policy = policy.get_output_embeddings().in_features
        return cls(rows, (positions, d_policy), rt.hidden_dtype, pin=rt.pin_memory)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, pin: bool = False) -> "HostRows":
        """(N, *row_shape) -> the same rows as a HostRows (tests, and small one-off uses)."""
        store = cls(x.shape[0], x.shape[1:], x.dtype, pin)
        store.scatter(torch.arange(x.shape[0]), x)
        return store

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def _row(self, i: int) -> torch.Tensor:
        chunk, offset = divmod(int(i), self.rows_per_chunk)
        return self.chunks[chunk][offset]

    def scatter(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write values (b, *row_shape), on any device, into rows `index` (b,). The dtype is converted where
        the values are (on the GPU: before the copy, so half the bytes cross), then each row is copied."""
        values = values.to(self.dtype)
        for j, i in enumerate(index.tolist()):
            self._row(i).copy_(values[j], non_blocking=self.pin)

    def gather(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows `index` (b,) -> (b, *row_shape) on `device`, copied row by row (from pinned memory: asynchronously)."""
        out = torch.empty((len(index), *self.row_shape), dtype=self.dtype, device=device)
        for j, i in enumerate(index.tolist()):
            out[j].copy_(self._row(i), non_blocking=self.pin)
        return out

    def tensor(self) -> torch.Tensor:
        """All rows as one (N, *row_shape) CPU tensor: a copy, for tests and small uses only."""
        return torch.cat(self.chunks) if self.chunks else torch.empty(self.shape, dtype=self.dtype)

    def synchronize(self) -> None:
        """Wait for the asynchronous copies into these rows, so the host may read them (a no-op without pinning)."""
        if self.pin and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
