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
    checkpoint_layers: Optional[int] = None  # with it, how many of the policy's decoder layers (None: all)
    cache_casts: bool = False  # the policy update's micro-batches share one bf16 cast of each weight (`cached_casts`)

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

    def autocast(self, cache: bool = False):
        """bf16 autocast with --bf16 (else nothing).
        Choice: no autocast weight cache, unless `cache`. With it, a region keeps a bf16 copy of every float32 weight
        it used until it ends (5.8 GiB for a 3B policy); without it each weight is cast when used and the copy freed
        with its layer. The policy update caches across a minibatch's micro-batches (`cached_casts`): its weights
        do not change within one, so each is cast once per optimiser step instead of once per micro-batch."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache)

    def cached_casts(self):
        """The autocast region of one optimiser step's micro-batches: their forwards run in it and their backwards in
        `no_autocast`. With --cache_weight_casts they share one bf16 cast of each float32 weight (autocast's cache lives
        until the outermost region ends, a bf16 copy of the policy meanwhile); without, each casts its own."""
        return self.autocast(cache=self.cache_casts)

    def no_autocast(self):
        """Inside `cached_casts`: autocast off (for a backward), the weight cache kept."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)


def make_runtime(cfg) -> Runtime:
    """cfg: anything with `device`, `bf16` and `gradient_checkpointing` (an `r2m.R2MConfig`)."""
    device = resolve_device(cfg.device)
    # --gradient_checkpointing left unset (on for CUDA) recomputes --checkpoint_layers of the policy's layers (0: none);
    # set true, all of them
    layers = getattr(cfg, "checkpoint_layers", -1)
    layers = layers if cfg.gradient_checkpointing is None and layers >= 0 else None
    return Runtime(
        device=device,
        autocast_dtype=torch.bfloat16 if on_for_cuda(cfg.bf16, device) else None,
        gradient_checkpointing=on_for_cuda(cfg.gradient_checkpointing, device) and layers != 0,
        checkpoint_layers=layers,
        cache_casts=getattr(cfg, "cache_weight_casts", True),
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


def checkpoint_activations(model: nn.Module, enabled: bool = True, layers: Optional[int] = None) -> None:
    """Recompute a Hugging Face model's layer activations in backward (in train mode), or stop doing so; through
    transformers' `activation_checkpointing_*` (named `gradient_checkpointing_*` before 5.x). layers: only the first
    `layers` decoder layers recompute, the others keep their activations (None: all)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}  # the non-reentrant kind: works with frozen inputs and no_grad parts
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if layers is not None:  # each decoder layer checks its own flag
            from transformers.modeling_layers import GradientCheckpointingLayer

            decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for i, layer in enumerate(decoder_layers):
                layer.gradient_checkpointing = i < layers
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
        checkpoint_activations(policy, layers=rt.checkpoint_layers)
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
    """A step's policy hidden states h, one row per trajectory, each of its own length (its real positions only),
    (L_i, D) in host memory.

    Choice: where h lives. A TL;DR step holds 8192 trajectories x ~400 positions x 2560 features, ~16 GB in bf16, which
    does not fit on the GPU beside three 2.8B models and the policy's AdamW state, so it stays in host memory and moves
    to the GPU a batch at a time. A row holds only the positions whose output predicts a real token (no padding), so
    host memory follows the prompts' real lengths, not the longest one. On a GPU run the memory is pinned, so both
    copies (the GPU writing rows after each forward, reading them for each RM and GREBT batch) are asynchronous. It is
    allocated once per step, in chunks of PINNED_CHUNK_BYTES (whole rows each): the pinned allocator rounds each
    allocation up to a power of two and keeps it, so one 16 GB buffer would reserve 16 GiB, a 17 GB one 32 GiB;
    256 MiB chunks waste less than a row each and are reused by the next step's rollout. Rows are written (`scatter`) and read
    (`gather`) by index; nothing ever concatenates them into one tensor."""

    def __init__(self, lengths: Sequence[int], width: int, dtype: torch.dtype, pin: bool = False):
        """lengths: each row's room, in positions (a row written later may fill less of it)."""
        self.capacity, self.width, self.dtype, self.pin = [int(n) for n in lengths], width, dtype, pin
        self.lengths = list(self.capacity)  # what each row holds: set by `scatter`
        sizes, self.place = self.layout(self.capacity, width, dtype)  # chunk sizes; row -> (chunk, first position)
        self.chunks = [self._allocate(n) for n in sizes]

    @staticmethod
    def layout(lengths: Sequence[int], width: int, dtype: torch.dtype) -> tuple[list[int], list[tuple[int, int]]]:
        """Rows packed in order into chunks of whole rows, up to PINNED_CHUNK_BYTES each (a longer row gets a chunk of
        its own) -> (positions per chunk, each row's (chunk, first position))."""
        per_chunk = max(1, PINNED_CHUNK_BYTES // max(1, width * torch.empty((), dtype=dtype).element_size()))
        sizes, place = [], []
        for n in lengths:
            if not sizes or sizes[-1] + n > per_chunk:
                sizes.append(0)
            place.append((len(sizes) - 1, sizes[-1]))
            sizes[-1] += n
        return sizes, place

    @classmethod
    def reserved_bytes(cls, lengths: Sequence[int], width: int, dtype: torch.dtype) -> int:
        """Host memory that rows of these lengths take when pinned: each chunk as the pinned allocator reserves it."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(pinned_bytes(n * width * size) for n in cls.layout(lengths, width, dtype)[0])

    def _allocate(self, positions: int) -> torch.Tensor:
        """One chunk of `positions` positions, (positions, width), uninitialised."""
        return torch.empty((positions, self.width), dtype=self.dtype, pin_memory=self.pin)

    @classmethod
    def for_policy(cls, lengths: Sequence[int], policy: nn.Module, rt: Runtime) -> "HostRows":
        """Host memory for trajectories whose rows have `lengths` positions of D_p features, in the run's hidden dtype."""
        return cls(lengths, policy.get_output_embeddings().in_features, rt.hidden_dtype, pin=rt.pin_memory)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, mask: Optional[torch.Tensor] = None, pin: bool = False) -> "HostRows":
        """(N, S, D) and which positions are real (N, S) (default: all) -> the same rows as a HostRows (tests, and
        small one-off uses)."""
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        store = cls(mask.sum(1).tolist(), x.shape[2], x.dtype, pin)
        store.scatter(torch.arange(x.shape[0]), x, mask)
        return store

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _row(self, i: int) -> torch.Tensor:
        chunk, start = self.place[int(i)]
        return self.chunks[chunk][start : start + self.lengths[int(i)]]

    def scatter(self, index: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Write rows `index` (b,) from values (b, S, D) on any device: row j gets values[j] at its real positions,
        mask[j] (b, S) bool on the CPU, one run of positions (padding only before and after them), at most the row's
        room. The dtype is converted where the values are (on the GPU: before the copy, so half the bytes cross), then
        each row is copied from a slice (no GPU sync to find it)."""
        values, mask = values.to(self.dtype), mask.bool().cpu()
        counts, starts = mask.sum(1), mask.long().argmax(1)  # (b,) each
        ends = mask.shape[1] - mask.flip(1).long().argmax(1)  # (b,) one past each row's last real position
        room = torch.tensor([self.capacity[i] for i in index.tolist()])
        if not torch.equal(torch.where(counts > 0, ends - starts, counts), counts) or bool((counts > room).any()):
            raise ValueError("each row must be one run of positions within its room: "
                             f"{counts.tolist()} positions for rooms {room.tolist()}")
        for j, (i, start, count) in enumerate(zip(index.tolist(), starts.tolist(), counts.tolist())):
            self.lengths[i] = count
            self._row(i).copy_(values[j, start : start + count], non_blocking=self.pin)

    def gather(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` (b,) -> h (b, L, D) on `device`, each row from position 0 and zero-padded to the longest, L,
        and its mask (b, L) bool; copied row by row (from pinned memory: asynchronously)."""
        lengths = [self.lengths[i] for i in index.tolist()]
        L = max(lengths, default=0)
        out = torch.zeros((len(lengths), L, self.width), dtype=self.dtype, device=device)
        for j, i in enumerate(index.tolist()):
            out[j, : lengths[j]].copy_(self._row(i), non_blocking=self.pin)
        mask = torch.arange(L)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]  # (b, L)
        return out, mask.to(device)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row as (N, L, D) zero-padded on the CPU, and its mask (N, L): a copy, for tests and small uses only."""
        return self.gather(torch.arange(self.rows), torch.device("cpu"))

    def synchronize(self) -> None:
        """Wait for the asynchronous copies into these rows, so the host may read them (a no-op without pinning)."""
        if self.pin and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
