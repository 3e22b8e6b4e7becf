"""Memory plan: will a training run fit the GPU? Predicted on a laptop, from the real step code.

    python benchmarks/memory_plan.py                                      # train_tldr.py's defaults, 80 GB GPU
    python benchmarks/memory_plan.py --script ultrafeedback               # LLaMA3-8B policy + Skywork 8B RM
    python benchmarks/memory_plan.py --script ultrafeedback --preset qwen # Qwen2.5-3B policy
    python benchmarks/memory_plan.py --gpu_memory_gib 40 --fit            # largest batch sizes that fit 40 GiB

Takes the training script's own flags (`--script tldr` reads train_tldr.py's, `--script ultrafeedback`
train_ultrafeedback.py's, presets included) and runs two steps of the real `r2m.train` on fake tensors
(PyTorch's FakeTensorMode: shapes, dtypes and storages, no data, no memory) with the models built at their
real sizes from the config files in benchmarks/configs/ (nothing is downloaded). A small dispatch mode counts
the bytes of every live tensor storage, phase by phase. Two steps, because from the second one the policy's
AdamW state exists; one batch per phase, because peaks depend on the batch sizes, not on how many batches a
step has. It prints each phase's predicted peak of allocated memory, what stays allocated between phases,
the peak of host memory (the models before they move to the GPU; a step's hidden states in pinned memory), and a
verdict line: `predicted peak X.X GiB of Y GiB (phase P): fits with Z.Z GiB to spare`.

What it cannot see (keep a margin for it, see docs/scale.md): the CUDA context and cuBLAS/cuDNN
workspaces, the caching allocator's fragmentation and rounding, kernel-internal temporaries, and the differences
between CPU autocast (used here: fake CPU tensors stand in for the GPU, since backward on fake CUDA tensors
needs a real device) and CUDA autocast's op lists.

The stand-ins, each a small patch made only inside this script while it runs:
- The run is configured as on a GPU (--bf16 and --gradient_checkpointing default to on; AdamW as r2m builds it on
  CUDA) but on the CPU device.
- The step's hidden states (`devices.HostRows`) are counted as host memory, at what the pinned-memory allocator
  reserves for each chunk (a power of two), not as GPU memory.
- The Pretrained RM (`--reward pretrained_rm`) is fine-tuned on fake preference pairs of the longest length, one
  minibatch of them.
- Sampling never stops early: no token is EOS and generation runs to --max_new_tokens (the worst case), and
  every data-dependent scalar reads a constant (`bool(tensor)` False, `.item()` 1): only logged statistics
  and the libraries' early exits depend on them.
- Only the first generation batch of a rollout is simulated, and of it the prefill and the last few decoding
  steps (`_wrap_generate` says why that keeps the peak); the other batches return padding of the same shape.
  The policy update runs on two micro-batches per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

# FakeTensorMode and TorchDispatchMode are private tools with no public equivalent; the plan was written and
# validated against torch 2.13 and needs at least 2.4 (fused AdamW on CPU tensors, the FakeTensorMode API used).
MIN_TORCH = (2, 4)
_version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if _version < MIN_TORCH:
    raise SystemExit(f"error: memory_plan.py needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {torch.__version__}")
try:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from transformers.generation.utils import GenerationMixin
except ImportError as e:  # pragma: no cover - depends on the installed versions
    raise SystemExit(f"error: memory_plan.py cannot use this torch/transformers ({torch.__version__}): {e}")
if not hasattr(GenerationMixin, "_has_unfinished_sequences"):
    raise SystemExit("error: memory_plan.py needs a transformers whose generate() loop asks _has_unfinished_sequences")

import baselines  # noqa: E402
import brme  # noqa: E402
import r2m  # noqa: E402
from launch import configs, flags, runner  # noqa: E402
from plumbing import data, devices, distributed  # noqa: E402

GiB = 2**30
aten = torch.ops.aten
CONFIG_DIR = os.path.join(ROOT, "benchmarks", "configs")
# The public config.json sizes of the models the scripts load by default (no weights, no tokenizer).
KNOWN_CONFIGS = {
    "trl-lib/pythia-2.8b-deduped-tldr-sft": "pythia-2.8b.json",
    "trl-lib/pythia-2.8b-deduped-tldr-rm": "pythia-2.8b.json",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b.json",
    "Qwen/Qwen2.5-3B-Instruct": "qwen2.5-3b.json",
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": "skywork-reward-v2-llama-3.1-8b.json",
}
PHASES = ["generation", "old/ref log-probs", "RM annotation", "policy forward/backward", "policy AdamW step",
          "RM update (GREBT)"]
BEFORE_RL = "RM fine-tuning (Pretrained RM, before RL)"  # step 0: the one phase before the first step
# What --fit searches: which phases' peaks each flag sets. The first three: the largest value that fits; the
# checkpointed layers: the fewest (searched after the micro-batch, which sets the same phase).
FIT_FLAGS = {
    "generation_batch_size": ["generation"],
    "forward_batch_size": ["old/ref log-probs", "RM annotation"],
    "micro_batch_size": ["policy forward/backward", "policy AdamW step"],
    "checkpoint_layers": ["policy forward/backward"],
}
# Choice: generation batches of at most 128 rows: wider, decoding is no longer bound by per-step overheads, and the
# plan's time per decode step (DECODE_STEP_SECONDS) is for batches up to this size.
GENERATION_CAP = 128


@dataclass
class PlanArgs:
    script: str = field(default="tldr", metadata={"help": "Which training script's flags and presets: 'tldr' or 'ultrafeedback'."})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "Memory of the GPU to plan for, GiB."})
    fit: bool = field(default=False, metadata={
        "help": "Search the largest generation (<= 128) / forward / micro batch sizes, and the fewest checkpointed policy "
                "layers, that keep --fit_reserve_gib free (--fit_flags says which)."})
    fit_flags: str = field(default=",".join(FIT_FLAGS), metadata={
        "help": "Comma-separated flags --fit searches, among " + ", ".join(FIT_FLAGS) + "; the others stay as given."})
    fit_reserve_gib: float = field(
        default=10.0, metadata={"help": "--fit keeps this much of the GPU free for what the plan cannot see."}
    )
    policy_config: Optional[str] = field(default=None, metadata={"help": "config.json of the policy (default: by model name)."})
    reward_config: Optional[str] = field(default=None, metadata={"help": "config.json of the RM (default: by model name)."})
    prompt_lengths: str = field(default=f"{configs.TLDR_PROMPT_LENGTHS[0]}:{configs.TLDR_PROMPT_LENGTHS[1]}", metadata={
        "help": "Prompt lengths the step's work is counted on: LOW:HIGH (uniform; the default matches TL;DR's mean and "
                "maximum under the Pythia tokenizer) or a JSON file holding a list of lengths. Memory is planned for "
                "the longest prompts (--max_prompt_tokens) whatever this says."})
    json_out: Optional[str] = field(default=None, metadata={
        "help": "Also write the plan to this JSON file: each phase's peak (bytes) at steps 1 and 2, host memory, the verdict."})


# ----------------------------------------------------------------------------------------------------
# Counting live bytes
# ----------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage made while active, until it is freed (a weakref finalizer on
    the storage), per phase; works alike on fake and real tensors, so the plan can be checked on real ones.
    Storages marked as host memory (r2m's copies to pinned host memory) are counted apart."""

    def __init__(self):
        super().__init__()
        self.device = 0  # live GPU-standing bytes
        self.host = 0  # live host bytes
        self.host_peak = 0
        self.sizes: dict[int, tuple[int, bool]] = {}  # storage id -> (bytes, on host)
        self.phase = "set-up"
        self.step = 0
        self.peaks: dict[tuple[int, str], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # A fake tensor has no value: `bool(t)` reads False and `.item()` 1 (not 0: AdamW divides by
            # 1 - beta^step). Only logged statistics and the libraries' early exits (all-ones masks, finished
            # sequences) depend on them.
            return False if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        # A concatenation of host tensors stays on the host (r2m's torch.cat of per-batch hidden states).
        host = func in (aten.cat.default, aten.stack.default) and all(
            self.is_host(t) for t in tree_leaves(args) if isinstance(t, torch.Tensor)
        )
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, host)
        return out

    def track(self, t: torch.Tensor, host: bool = False) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        nbytes = storage.nbytes()
        self.sizes[key] = (nbytes, host)
        weakref.finalize(storage, self._free, key)
        if host:
            self.host += nbytes
        else:
            self.device += nbytes
            k = (self.step, self.phase)
            self.peaks[k] = max(self.peaks.get(k, 0), self.device)

    def _free(self, key: int) -> None:
        nbytes, host = self.sizes.pop(key)
        if host:
            self.host -= nbytes
        else:
            self.device -= nbytes

    def is_host(self, t: torch.Tensor) -> bool:
        return self.sizes.get(t.untyped_storage()._cdata, (0, False))[1]

    def mark_host(self, t: torch.Tensor, reserved: Optional[int] = None) -> None:
        """Count t's storage as host memory, of `reserved` bytes (what an allocator sets aside for it) if given."""
        key = t.untyped_storage()._cdata
        if key in self.sizes and not self.sizes[key][1]:
            nbytes, _ = self.sizes[key]
            self.device -= nbytes
            nbytes = reserved if reserved is not None else nbytes
            self.sizes[key] = (nbytes, True)
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)

    @contextlib.contextmanager
    def in_phase(self, name: str):
        outer, self.phase = self.phase, name
        k = (self.step, name)
        self.peaks[k] = max(self.peaks.get(k, 0), self.device)
        try:
            yield
        finally:
            self.phase = outer
            k = (self.step, outer)
            self.peaks[k] = max(self.peaks.get(k, 0), self.device)

    def bytes_of(self, tensors) -> int:
        """Tracked bytes of the distinct storages behind `tensors`."""
        keys = {t.untyped_storage()._cdata for t in tensors if t is not None}
        return sum(self.sizes.get(k, (0, False))[0] for k in keys)


# ----------------------------------------------------------------------------------------------------
# The stand-ins: r2m as on a GPU, on CPU tensors (all undone on exit)
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class Recorder:
    """What the plan learns while r2m runs: models, optimisers, held memory at each phase start, KV cache."""

    def __init__(self, counter: LiveBytes, policy_rows: int):
        self.counter, self.policy_rows = counter, policy_rows
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[weakref.ref] = []  # weak: an optimiser r2m drops (the Pretrained RM's) must go
        self.held: dict[tuple[int, str], dict] = {}
        self.kv_cache_bytes = 0
        self.kv_cache_dtype: Optional[torch.dtype] = None
        self.generations_left = 0  # per rollout: simulate the first generation batch only
        self.skip_peak_of_next_forward = False
        self.decode_steps_left = 0
        self.models_host_bytes = 0  # the three models in host memory, before they move to the GPU
        self.row_lengths: list[int] = []  # positions of h per row of the last rollout

    def snapshot(self, name: str) -> None:
        params = [p for m in self.models for p in m.parameters()]
        weights = self.counter.bytes_of(params)
        grads = self.counter.bytes_of([p.grad for p in params])
        optim = self.counter.bytes_of(
            [v for ref in self.optimizers if (o := ref()) is not None for s in o.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
        )
        self.held[(self.counter.step, name)] = dict(
            weights=weights, grads=grads, optimizer=optim, other=self.counter.device - weights - grads - optim,
            total=self.counter.device, host=self.counter.host,
        )

    def phase(self, name: str, fn):
        """Wrap an r2m function so it runs as phase `name` (held memory recorded at its start)."""

        def wrapped(*args, **kwargs):
            self.snapshot(name)
            with self.counter.in_phase(name):
                return fn(*args, **kwargs)

        return wrapped


@contextlib.contextmanager
def gpu_standins(counter: LiveBytes, rec: Recorder):
    """Make r2m.train behave as on a GPU while running on (fake) CPU tensors, and mark the phases."""
    original = {name: getattr(r2m, name) for name in ("rollout", "annotate_rewards", "policy_update",
                                                       "reward_model_update")}
    original["pretrain_reward_model"] = baselines.pretrain_reward_model
    original["prepare_models"] = devices.prepare_models
    allocate, place = devices.HostRows._allocate, distributed.place_models
    for_policy, scatter = devices.HostRows.for_policy, devices.HostRows.scatter

    def prepare_models(policy, ref_policy, reward_model, rt, **kwargs):
        rec.models[:] = [policy, ref_policy, reward_model]
        original["prepare_models"](policy, ref_policy, reward_model, rt, **kwargs)
        _wrap_generate(policy, counter, rec)

    def place_models(policy, ref_policy, reward_model, *args, **kwargs):
        # Until they move to the GPU, the models are in host memory (as loaded, in the dtypes just set).
        models = (policy, ref_policy, reward_model)
        rec.models_host_bytes = counter.bytes_of([t for m in models for t in (*m.parameters(), *m.buffers())])
        return place(*models, *args, **kwargs)

    def allocate_host_rows(self, n):
        # On a GPU the chunk is pinned host memory, of the size the pinned allocator reserves for it.
        chunk = allocate(self, n)
        counter.mark_host(chunk, reserved=devices.pinned_bytes(chunk.untyped_storage().nbytes()))
        return chunk

    def rollout(policy, ref_policy, tokenizer, prompts, prompt_texts, cfg, *args, **kwargs):
        counter.step += 1
        rec.generations_left = 1
        # every response runs to --max_new_tokens (no EOS), so each row's h has its prompt's length + R - 1 positions
        rec.row_lengths = [len(p) + cfg.max_new_tokens - 1 for p in prompts for _ in range(cfg.group_size)]
        rec.snapshot("generation")  # before r2m swaps in the bf16 generation weights
        return rec.phase("old/ref log-probs", original["rollout"])(policy, ref_policy, tokenizer, prompts, prompt_texts,
                                                                   cfg, *args, **kwargs)

    def host_rows_for_policy(lengths, policy, rt):
        # A fake tensor has no values to count lengths from: a rollout's rows have the lengths recorded above
        return for_policy.__func__(devices.HostRows, rec.row_lengths if len(lengths) == len(rec.row_lengths)
                                   else lengths, policy, rt)

    def host_rows_scatter(self, index, values, mask):
        # Fake tensors have no values to find a row's positions by: what the GPU holds meanwhile is the converted batch
        if isinstance(values, FakeTensor):
            return values.to(self.dtype)
        return scatter(self, index, values, mask)

    def policy_update(policy, optimizer, ro, advantages, cfg, rt):
        # Two micro-batches per epoch (one accumulation), as views of the rollout: the peak is the same for any
        # number of micro-batches.
        m = rec.policy_rows
        view = {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}
        for name, value in view.items():
            if isinstance(value, torch.Tensor) and value.shape[0] == ro.query_responses.shape[0]:
                view[name] = value[:m]
        return rec.phase("policy forward/backward", original["policy_update"])(
            policy, optimizer, type(ro)(**view), advantages[:m], cfg, rt
        )

    class AdamW(torch.optim.AdamW):
        """What torch.optim.AdamW is on CUDA: fused when r2m asks for it (it passes `fused=` only to choose
        the fused kernel on CUDA), otherwise torch's CUDA default, the multi-tensor (foreach) version."""

        def __init__(self, params, *args, **kwargs):
            if "fused" in kwargs:
                kwargs["fused"] = True
            else:
                kwargs["foreach"] = True
            super().__init__(params, *args, **kwargs)
            rec.optimizers.append(weakref.ref(self))
            self._is_policy = len(rec.optimizers) == 1  # r2m.train builds the policy's optimiser first

        def step(self, closure=None):
            if not self._is_policy:
                return super().step(closure)
            with counter.in_phase("policy AdamW step"):
                return super().step(closure)

    def has_unfinished(self, this_peer_finished, synced_gpus, device):
        # Generation runs exactly max_new_tokens steps (no token is EOS), on fake and real tensors alike.
        rec.decode_steps_left -= 1
        return rec.decode_steps_left >= 0

    with contextlib.ExitStack() as stack:
        for name, value in [
            ("rollout", rollout), ("annotate_rewards", rec.phase("RM annotation", original["annotate_rewards"])),
            ("policy_update", policy_update),
            ("reward_model_update", rec.phase("RM update (GREBT)", original["reward_model_update"])),
        ]:
            stack.enter_context(patched(r2m, name, value))
        stack.enter_context(patched(baselines, "pretrain_reward_model", rec.phase(BEFORE_RL, original["pretrain_reward_model"])))
        stack.enter_context(patched(devices, "prepare_models", prepare_models))
        # flags whose default is "on for CUDA" (--gradient_checkpointing, with --checkpoint_layers) default as on a GPU
        stack.enter_context(patched(devices, "on_for_cuda", lambda flag, device: True if flag is None else bool(flag)))
        stack.enter_context(patched(distributed, "place_models", place_models))
        stack.enter_context(patched(devices.HostRows, "_allocate", allocate_host_rows))
        stack.enter_context(patched(devices.HostRows, "for_policy", staticmethod(host_rows_for_policy)))
        stack.enter_context(patched(devices.HostRows, "scatter", host_rows_scatter))
        # A batch is cut to its longest row by reading its mask's values, which fake tensors lack: the plan runs every
        # batch at the step's full width (its prompts are the longest the script keeps: the worst case anyway)
        stack.enter_context(patched(r2m, "window", lambda mask: slice(0, mask.shape[1])))
        stack.enter_context(patched(torch.optim, "AdamW", AdamW))
        stack.enter_context(patched(GenerationMixin, "_has_unfinished_sequences", has_unfinished))
        yield


DECODE_STEPS = 3  # decoding steps simulated token by token at the end of a generation (see _wrap_generate)


def _wrap_generate(policy, counter: LiveBytes, rec: Recorder) -> None:
    """policy.generate as phase 'generation', shortened without changing its peak, and the KV cache's size.

    A generation's memory peaks either in its prefill (the prompt's activations) or at its last decoding step
    (the longest KV cache); the steps between differ only by one token of cache each. So the plan simulates
    (1) the prefill of the real prompt, then (2) the last DECODE_STEPS steps, after a prefill of
    prompt + max_new_tokens - DECODE_STEPS tokens that stands for the earlier steps and is not counted as a
    peak of the phase (its cache at the end is the one those steps would have built). This makes a 512-token
    generation cost a few forwards instead of 512."""
    import copy

    generate = type(policy).generate

    def on_forward(module, args, kwargs, output):
        if rec.skip_peak_of_next_forward:
            rec.skip_peak_of_next_forward = False
            counter.phase = "generation"
            k = (counter.step, "generation")
            counter.peaks[k] = max(counter.peaks.get(k, 0), counter.device)
        cache = getattr(output, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if layers:
            tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
            tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
            if tensors:
                rec.kv_cache_bytes = max(rec.kv_cache_bytes, counter.bytes_of(tensors))
                rec.kv_cache_dtype = tensors[0].dtype

    def before_forward(module, args, kwargs):
        if rec.skip_peak_of_next_forward:
            counter.phase = "generation stand-in prefill"

    policy.register_forward_pre_hook(before_forward, with_kwargs=True)
    policy.register_forward_hook(on_forward, with_kwargs=True)

    def run(input_ids, attention_mask, gen_config, new_tokens, **kwargs):
        gen_config = copy.deepcopy(gen_config)
        gen_config.max_new_tokens = new_tokens
        rec.decode_steps_left = new_tokens
        return generate(policy, input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config, **kwargs)

    def wrapped(*, input_ids, attention_mask, generation_config, **kwargs):
        R = generation_config.max_new_tokens
        b = input_ids.shape[0]
        if rec.generations_left <= 0:  # same shapes as a real batch; memory was seen on the first one
            return torch.cat([input_ids, torch.zeros(b, R, dtype=input_ids.dtype)], dim=1)
        rec.generations_left -= 1
        with counter.in_phase("generation"):
            if R <= DECODE_STEPS + 1:
                return run(input_ids, attention_mask, generation_config, R, **kwargs)
            run(input_ids, attention_mask, generation_config, 1, **kwargs)  # (1) the real prefill
            fill = R - DECODE_STEPS  # (2) stand-in tokens for the first decoding steps, then the last ones
            long_ids = torch.cat([input_ids, torch.zeros(b, fill, dtype=input_ids.dtype)], dim=1)
            long_mask = torch.cat([attention_mask, torch.ones(b, fill, dtype=attention_mask.dtype)], dim=1)
            rec.skip_peak_of_next_forward = True
            return run(long_ids, long_mask, generation_config, DECODE_STEPS, **kwargs)

    policy.generate = wrapped


# ----------------------------------------------------------------------------------------------------
# One plan: two steps of r2m.train
# ----------------------------------------------------------------------------------------------------


def plan_config(cfg: r2m.R2MConfig, output_dir: str) -> tuple[r2m.R2MConfig, int]:
    """The config the simulation runs: the same batch sizes, with just enough trajectories for one batch of each
    phase, two steps, no checkpoints. Returns it and the policy rows used per epoch (two micro-batches)."""
    K, micro = cfg.group_size, cfg.micro_batch_size
    rows = 2 * micro
    unit = K * rows // math.gcd(K, rows)
    need = max(cfg.generation_batch_size, cfg.forward_batch_size, cfg.rm_minibatch_groups * K, rows)
    N = unit * math.ceil(need / unit)
    sim = dataclasses.replace(
        cfg, queries_per_step=N // K, total_trajectories=2 * N, policy_minibatch_size=rows, save_every=0,
        sample_every=0, resume=False, output_dir=output_dir, missing_eos_penalty=None, device="cpu",
        bf16=True if cfg.bf16 is None else cfg.bf16,  # as on a GPU (and --gradient_checkpointing: gpu_standins)
        pretrain_rm_epochs=1,
    )
    return sim, rows


def plan_prompts(n: int, prompt_tokens: int, vocab: int) -> list[list[int]]:
    """n prompts of `prompt_tokens` or one fewer tokens (so batches hold padding, as real ones do)."""
    return [[1 + (7 * i + j) % (vocab - 2) for j in range(prompt_tokens - i % 2)] for i in range(n)]


def _apply_by_set_data(self, fn, recurse=True):
    """Module._apply (behind .to / .float) for fake parameters. torch swaps a fake parameter for its converted
    copy (torch.utils.swap_tensors), which fails once the fake-tensor machinery holds a weak reference to it;
    assigning `.data`, as torch does for ordinary tensors, converts it just the same."""
    if recurse:
        for module in self.children():
            _apply_by_set_data(module, fn)
    for param in self._parameters.values():
        if param is not None:
            with torch.no_grad():
                converted = fn(param)
            if converted is not param:
                param.data = converted
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


def simulate(cfg: r2m.R2MConfig, build_models, prompt_tokens: int, fake: bool = True, prompts=None) -> dict:
    """Run two steps of r2m.train with the GPU stand-ins, on fake tensors (or real ones, to check the plan).
    build_models() -> (policy, ref_policy, rm, vocab_size); returns peaks per (step, phase), held memory, etc."""
    counter = LiveBytes()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        sim, rows = plan_config(cfg, tmp)
        rec = Recorder(counter, rows)
        if fake:
            stack.enter_context(patched(torch.nn.Module, "_apply", _apply_by_set_data))
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(counter)
        policy, ref_policy, rm, vocab = build_models()
        # pad 0; an EOS id outside the vocabulary is never sampled, so every response has max_new_tokens tokens
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=vocab + 1)
        reward_model = runner.build_reward(sim, rm, policy)
        prompts = prompts or plan_prompts(4 * sim.queries_per_step, prompt_tokens, vocab)
        # The Pretrained RM's fine-tuning: one minibatch of pairs whose responses are as long as any.
        pairs = None
        if r2m.REWARD_MODES[sim.reward].fit_on:  # the Pretrained RM (BRME is not planned)
            length = prompt_tokens + sim.max_new_tokens
            pairs = tuple(data.pad_right([[1 + (i + j) % (vocab - 2) for j in range(length)]
                                         for i in range(sim.pretrain_rm_batch_size)], 0) for _ in range(2))
        stack.enter_context(gpu_standins(counter, rec))
        # The RM reads the policy's token ids (rm_view=None): a chat RM's own template adds a few dozen tokens,
        # a few percent of its activations.
        with _real_prompt_choice():
            r2m.train(policy, ref_policy, reward_model, tokenizer, prompts, sim, preferences=pairs)
        stack.close()
        return dict(peaks=dict(counter.peaks), held=rec.held, kv_cache_bytes=rec.kv_cache_bytes,
                    kv_cache_dtype=rec.kv_cache_dtype, rows=sim.trajectories_per_step, host_peak=counter.host_peak,
                    models_host_bytes=rec.models_host_bytes, d_policy=policy.get_output_embeddings().in_features,
                    row_lengths=rec.row_lengths)


@contextlib.contextmanager
def _real_prompt_choice():
    """Which prompts a step takes is decided on real tensors (a seeded permutation), so batches have the
    prompt lengths, and padding, that a real run would have."""
    choose = r2m.step_prompt_indices

    def step_prompt_indices(*args, **kwargs):
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return choose(*args, **kwargs)

    with patched(r2m, "step_prompt_indices", step_prompt_indices):
        yield


def config_builder(policy_json: str, reward_json: str, bf16: bool):
    """build_models() for simulate(): the policy in float32, the reference and the RM in bf16 (as
    runner.load_pretrained loads them on a GPU), from config files only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    frozen = torch.bfloat16 if bf16 else torch.float32

    def build():  # the one function that turns a config file into a model config (the GPU check builds with it too)
        pc, rc = configs.model_config(policy_json), configs.model_config(reward_json, num_labels=1)
        policy = AutoModelForCausalLM.from_config(pc, dtype=torch.float32)
        ref_policy = AutoModelForCausalLM.from_config(pc, dtype=frozen)
        rm = AutoModelForSequenceClassification.from_config(rc, dtype=frozen)
        return policy, ref_policy, rm, pc.vocab_size

    return build


# ----------------------------------------------------------------------------------------------------
# What a step costs: its FLOPs per phase and its padding, counted for every batch, and the time they predict
# ----------------------------------------------------------------------------------------------------

# The two constants every prediction uses (assumptions, stated once; the GPU check measures both on a real H100):
H100_FLOPS = 400e12  # forward / backward work: 40 % of the H100's 989 TFLOP/s dense bf16 peak
DECODE_STEP_SECONDS = 0.030  # one decoding step of a generation batch of at most 128 rows
COST_PHASES = ["generation", "old/ref log-probs", "RM annotation", "policy update", "RM update (GREBT)"]


def count_flops(fn) -> int:
    """FLOPs of fn(), as PyTorch's FLOP counter counts them (matrix products; on a CPU it leaves out the attention
    scores' S² term, a few percent at 512 tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass
class Rates:
    """FLOPs per token (or per logit position, per position of h) of each piece of a step, counted on the fake
    full-size models: a transformer's matrix products grow linearly in its tokens, so one shape gives the rate, and a
    second checks it."""

    policy: float  # the policy's backbone, forward, per token
    policy_backward: float  # its backward, per token
    head: float  # the LM head, forward, per position that computes logits
    head_backward: float
    rm: float  # the RM's body, forward, per token
    feedback: float  # the cross-attention over h, forward + backward, per position of h (R2M's GREBT step)
    policy_layers: int  # the policy's decoder layers (what --checkpoint_layers counts)


def flop_rates(build_models, d_attn: int) -> Rates:
    """Count each piece at (1, 64) and (2, 32) tokens on the fake models (they must agree), and the cross-attention
    at 64 and 32 positions (the difference: its rate per position)."""
    with FakeTensorMode(allow_non_fake_inputs=True), patched(torch.nn.Module, "_apply", _apply_by_set_data):
        policy, _, rm, _ = build_models()
        backbone, head = policy.get_decoder(), policy.get_output_embeddings()

        def forward(fn) -> int:
            with torch.no_grad():
                return count_flops(fn)

        def backward(fn) -> int:
            out = fn()
            out = getattr(out, "last_hidden_state", out)
            return count_flops(lambda: out.float().sum().backward())

        rates = []
        for b, S in ((1, 64), (2, 32)):
            ids, states = torch.zeros(b, S, dtype=torch.long), torch.zeros(b, S, head.in_features, requires_grad=True)
            counts = [forward(lambda: backbone(input_ids=ids)), backward(lambda: backbone(input_ids=ids)),
                      forward(lambda: head(states)), backward(lambda: head(states)), forward(lambda: rm.base_model(ids))]
            rates.append([c / (b * S) for c in counts])
        # Some transformers versions compute the rotary angles once per position, not per row, as a small product
        # the counter sees (a few FLOPs per token out of ~10^10): the two shapes agree to far better than 0.1%.
        assert all(abs(x - y) <= 1e-3 * max(x, y) for x, y in zip(*rates)), \
            f"the FLOP counter's counts are not linear in tokens: {rates}"
        attention = r2m.PolicyFeedbackAttention(rm.score.in_features, head.in_features, d_attn)
        h_last = torch.zeros(1, rm.score.in_features)

        def feedback(positions: int) -> int:  # forward and backward of the cross-attention over one row's h
            h, mask = torch.zeros(1, positions, head.in_features), torch.ones(1, positions, dtype=torch.bool)
            return forward(lambda: attention(h_last, h, mask)) + backward(lambda: attention(h_last, h, mask))

        return Rates(*rates[0], feedback=(feedback(64) - feedback(32)) / 32,
                     policy_layers=policy.config.num_hidden_layers)


@dataclass
class StepCost:
    """One step's work, per phase: FLOPs, token slots (rows x columns of every forward batch) and real tokens among
    them, and decoding steps; `seconds` predicts its time on one H100 from the two constants above."""

    flops: dict = field(default_factory=lambda: {p: 0.0 for p in COST_PHASES})
    slots: dict = field(default_factory=lambda: {p: 0 for p in COST_PHASES})
    real: dict = field(default_factory=lambda: {p: 0 for p in COST_PHASES})
    decode_steps: int = 0

    def add(self, phase: str, flops: float, slots: int = 0, real: int = 0) -> None:
        self.flops[phase] += flops
        self.slots[phase] += slots
        self.real[phase] += real

    def seconds(self, phase: str) -> float:
        return self.flops[phase] / H100_FLOPS + (self.decode_steps * DECODE_STEP_SECONDS if phase == "generation" else 0)

    @property
    def padding(self) -> float:
        """The share of the step's token slots that are padding, over every forward batch of every phase."""
        slots = sum(self.slots.values())
        return 1 - sum(self.real.values()) / slots if slots else 0.0

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds(p) for p in COST_PHASES)


def step_cost(cfg: r2m.R2MConfig, lengths: list[int], rates: Rates, padded: bool = False, seed: int = 0) -> StepCost:
    """Every batch of one step of `cfg` on prompts of `lengths` (n of them), with responses of --max_new_tokens (no
    EOS: the longest a step can be), batched as r2m.py batches them: the step's groups longest prompt first, each
    generation / forward batch cut to its own longest row, the policy update's minibatches drawn at random and sorted
    before they are split into micro-batches, each cut to its own longest row, the LM head on the R + 1 last positions,
    --checkpoint_layers of the policy's layers recomputed (as on a GPU). padded=True counts the batching before this:
    every batch at the step's longest row, logits at every position, every layer recomputed."""
    K, R, mode = cfg.group_size, cfg.max_new_tokens, r2m.REWARD_MODES[cfg.reward]
    rows = [p for p in lengths for _ in range(K)]  # the step's N prompts' lengths, group by group
    if not padded:
        rows.sort(reverse=True)  # r2m.train: longest prompt first
    widest, cost = max(rows), StepCost()

    def width(batch: list[int]) -> int:  # the batch's columns of prompt
        return widest if padded else max(batch)

    def batches(items: list[int], size: int):
        return [items[i : i + size] for i in range(0, len(items), size)]

    for batch in batches(rows, cfg.generation_batch_size):  # prefill (logits at its last position), then R decoding steps
        b, S = len(batch), width(batch)
        cost.add("generation", b * S * rates.policy + b * rates.head, b * S, sum(batch))
        cost.decode_steps += R
    for batch in batches(rows, cfg.forward_batch_size):  # the policy and the reference on the same batches; the RM
        b, S = len(batch), width(batch) + R
        head = b * (S if padded else R + 1)
        cost.add("old/ref log-probs", 2 * (b * S * rates.policy + head * rates.head), 2 * b * S, 2 * sum(batch) + 2 * b * R)
        cost.add("RM annotation", b * S * rates.rm, b * S, sum(batch) + b * R)
    layers = cfg.checkpoint_layers if (cfg.gradient_checkpointing is None and cfg.checkpoint_layers >= 0) else None
    recomputed = 1.0 if padded or layers is None else min(layers, rates.policy_layers) / rates.policy_layers
    if cfg.gradient_checkpointing is False:
        recomputed = 0.0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cfg.policy_epochs):
        order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        for minibatch in batches(order, cfg.policy_minibatch_size):
            for batch in batches(minibatch if padded else sorted(minibatch, reverse=True), cfg.micro_batch_size):
                b, S = len(batch), width(batch) + R
                head = b * (S if padded else R + 1)
                flops = b * S * (rates.policy * (1 + recomputed) + rates.policy_backward) \
                    + head * (rates.head + rates.head_backward)
                cost.add("policy update", flops, b * S, sum(batch) + b * R)
    if mode.train and mode.sees_policy:  # the cross-attention over each row's h, forward and backward
        positions = len(rows) * (widest + R - 1) if padded else sum(p + R - 1 for p in rows)
        cost.add("RM update (GREBT)", positions * rates.feedback)
    return cost


def cost_report(cost: StepCost, before: StepCost, cfg: r2m.R2MConfig, lengths: list[int], label: str) -> list[str]:
    """The cost table and its lines: the padding, and the predicted step and run."""
    T = cfg.total_steps
    lines = ["", f"one step's work ({len(lengths)} prompts x {cfg.group_size}, prompt lengths {label}, mean "
             f"{sum(lengths) / len(lengths):.1f}; responses of {cfg.max_new_tokens} tokens), predicted on one H100 at "
             f"{H100_FLOPS / 1e12:.0f} TFLOP/s of forward/backward work and {DECODE_STEP_SECONDS * 1e3:.0f} ms per decode "
             "step (a prediction):", f"{'phase':<22}{'PFLOP':>9}{'padding':>9}{'seconds':>9}"]
    for phase in COST_PHASES:
        pad = 1 - cost.real[phase] / cost.slots[phase] if cost.slots[phase] else 0.0
        lines.append(f"{phase:<22}{cost.flops[phase] / 1e15:>9.1f}{pad:>9.1%}{cost.seconds(phase):>9.0f}")
    days = lambda c: c.step_seconds * T / 86400  # noqa: E731
    lines += [f"{'step':<22}{sum(cost.flops.values()) / 1e15:>9.1f}{cost.padding:>9.1%}{cost.step_seconds:>9.0f}",
              f"padded batching as before (every batch at the step's longest row, logits at every position, every layer "
              f"recomputed, generation batch 64): padding {before.padding:.1%}, {sum(before.flops.values()) / 1e15:.1f} "
              f"PFLOP and {before.step_seconds:.0f} s a step, {days(before):.2f} GPU-days a run",
              f"padding: {cost.padding:.1%} of the step's tokens",
              f"predicted run: {days(cost):.2f} GPU-days on one H100 ({T} steps of {cost.step_seconds:.0f} s; "
              f"{days(cost) / days(before) - 1:+.0%} against padded batching; a prediction)"]
    return lines


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def step_peaks(result: dict, step: int) -> dict[str, int]:
    return {p: result["peaks"].get((step, p), 0) for p in PHASES}


def verdict(result: dict, gpu_gib: float) -> tuple[float, str, str]:
    peaks = {(s, p): v for (s, p), v in result["peaks"].items() if p in PHASES or p == BEFORE_RL}
    (step, phase), peak = max(peaks.items(), key=lambda kv: kv[1])
    gib = peak / GiB
    line = f"predicted peak {gib:.1f} GiB of {gpu_gib:.1f} GiB (phase {phase}, step {step}): "
    line += f"fits with {gpu_gib - gib:.1f} GiB to spare" if gib <= gpu_gib else f"does not fit ({gib - gpu_gib:.1f} GiB over)"
    return gib, phase, line


def host_plan(result: dict, cfg: r2m.R2MConfig, lengths: list[int]) -> dict[str, int]:
    """Host memory (CPU RAM) of one process, bytes: the models before they move to the GPU (as loaded, in the run's
    dtypes), and a full step's hidden states in pinned memory for prompts of `lengths` (n of them) and responses of
    --max_new_tokens (`devices.HostRows`: each row its real positions, in r2m.train's order, chunks as the pinned
    allocator reserves them; ReMax also keeps its greedy responses'). The step's other CPU tensors (token ids, masks,
    log-probs) are a few hundred MB at most."""
    mode, algo = r2m.REWARD_MODES[cfg.reward], r2m.ALGOS[cfg.algo]
    dtype = torch.bfloat16 if cfg.bf16 is not False else torch.float32
    prompts = sorted(lengths, reverse=True)  # r2m.train: longest prompt first
    rows = [p + cfg.max_new_tokens - 1 for p in prompts for _ in range(cfg.group_size)]
    hidden = devices.HostRows.reserved_bytes(rows, result["d_policy"], dtype) if mode.sees_policy else 0
    greedy = devices.HostRows.reserved_bytes([p + cfg.max_new_tokens - 1 for p in prompts], result["d_policy"], dtype) \
        if mode.sees_policy and algo.baseline is not None else 0
    models = result["models_host_bytes"]
    return dict(models=models, hidden=hidden, greedy=greedy, peak=max(models, hidden + greedy))


def report(result: dict, cfg: r2m.R2MConfig, gpu_gib: float, header: str, prompt_tokens: int, lengths: list[int],
           cost_lines: list[str]) -> str:
    g = lambda b: f"{b / GiB:6.1f}"  # noqa: E731
    lines = [header, "", f"{'phase':<26}{'step 1 peak':>12}{'step 2 peak':>12}   held at its start, step 2 (GiB)"]
    if (0, BEFORE_RL) in result["peaks"]:
        lines.append(f"{BEFORE_RL} (before step 1): peak {result['peaks'][(0, BEFORE_RL)] / GiB:.1f}")
    p1, p2 = step_peaks(result, 1), step_peaks(result, 2)
    for p in PHASES:
        h = result["held"].get((2, p))
        held = (f"   {g(h['total'])}  = weights {h['weights'] / GiB:.1f} + grads {h['grads'] / GiB:.1f} + "
                f"AdamW {h['optimizer'] / GiB:.1f} + other {h['other'] / GiB:.1f}") if h else ""
        lines.append(f"{p:<26}{g(p1[p]):>12}{g(p2[p]):>12}{held}")
    kv = result["kv_cache_bytes"]
    lines.append("")
    lines.append(f"KV cache at the last decoding step: {kv / GiB:.1f} GiB ({str(result['kv_cache_dtype']).replace('torch.', '')}, "
                 f"{cfg.generation_batch_size} sequences)")
    host, worst = host_plan(result, cfg, lengths), host_plan(result, cfg, [prompt_tokens] * cfg.queries_per_step)
    greedy = f" + ReMax's greedy responses {host['greedy'] / GiB:.1f}" if host["greedy"] else ""
    lines.append(f"host memory: models before they move to the GPU {host['models'] / GiB:.1f} GiB; a step's hidden states "
                 f"{host['hidden'] / GiB:.1f} GiB pinned ({cfg.trajectories_per_step} trajectories at their own lengths; "
                 f"{worst['hidden'] / GiB:.1f} if every prompt had {prompt_tokens} tokens){greedy}; predicted host peak "
                 f"{host['peak'] / GiB:.1f} GiB")
    lines += cost_lines
    lines.append(verdict(result, gpu_gib)[2])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# --fit
# ----------------------------------------------------------------------------------------------------


def fit_candidates(flag: str, cfg: r2m.R2MConfig, layers: int) -> list[int]:
    """The values --fit tries for a flag, ordered so that later ones need more memory of their phase: batch sizes
    1, 2, 4, then multiples of 8 (micro-batches: the divisors of the minibatch); layers: all of them down to none."""
    if flag == "checkpoint_layers":
        return list(range(layers, -1, -1))
    if flag == "micro_batch_size":
        return [m for m in range(1, cfg.policy_minibatch_size + 1) if cfg.policy_minibatch_size % m == 0]
    top = min(cfg.trajectories_per_step, GENERATION_CAP if flag == "generation_batch_size" else cfg.trajectories_per_step)
    return sorted({v for v in (1, 2, 4, *range(8, top + 1, 8), top) if v <= top})


def fit(cfg: r2m.R2MConfig, run, budget_gib: float, flags=tuple(FIT_FLAGS), layers: int = 0,
        log=print) -> tuple[r2m.R2MConfig, dict]:
    """For each flag of `flags`, the last of its candidates whose phases peak within budget_gib: a bisection from the
    current value (doubling outwards until it is bracketed). Flags that set different phases share each round's one
    simulation; the checkpointed layers are searched after the micro-batch, which sets the same phase. layers: the
    policy's decoder layers."""
    stages = [[f for f in flags if f != "checkpoint_layers"], [f for f in flags if f == "checkpoint_layers"]]
    result = None
    for stage in (s for s in stages if s):
        options = {k: fit_candidates(k, cfg, layers) for k in stage}
        current = {k: getattr(cfg, k) if k != "checkpoint_layers" or cfg.checkpoint_layers >= 0 else layers for k in stage}
        index = {k: min(range(len(options[k])), key=lambda i: abs(options[k][i] - current[k])) for k in stage}
        good: dict[str, Optional[int]] = {k: None for k in stage}  # the highest index known to fit
        bad: dict[str, Optional[int]] = {k: None for k in stage}  # the lowest index known not to
        while True:
            cfg = dataclasses.replace(cfg, **{k: options[k][index[k]] for k in stage})
            result = run(cfg)
            peaks = step_peaks(result, 2)
            log("  tried " + ", ".join(f"{k} {getattr(cfg, k)}" for k in stage) + " -> "
                + ", ".join(f"{p} {peaks[p] / GiB:.1f}" for p in PHASES) + " GiB")
            settled = True
            for k in stage:
                if max(peaks[p] for p in FIT_FLAGS[k]) <= budget_gib * GiB:
                    good[k] = max(index[k], good[k] if good[k] is not None else -1)
                else:
                    bad[k] = min(index[k], bad[k] if bad[k] is not None else len(options[k]))
                if good[k] is None and bad[k] == 0:
                    raise SystemExit(f"error: even --{k} {options[k][0]} does not fit {budget_gib:.1f} GiB: the weights "
                                     "and optimiser state alone are too large (see the table)")
                top = bad[k] if bad[k] is not None else len(options[k])
                if good[k] is not None and good[k] + 1 >= top:
                    settled &= index[k] == good[k]
                    index[k] = good[k]  # found: the last that fits, next to one that does not (or the last)
                elif good[k] is None:
                    index[k] = bad[k] // 2  # halve
                    settled = False
                else:
                    index[k] = (good[k] + top) // 2 if bad[k] is not None else min(len(options[k]) - 1, 2 * good[k] + 1)
                    settled = False
            if settled:
                break
    return cfg, result


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse(argv: Optional[list[str]]):
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    plan_parser = HfArgumentParser(PlanArgs, add_help=False, allow_abbrev=False)  # --reward is the script's, not --reward_config
    plan, rest = plan_parser.parse_known_args(argv)
    if "-h" in argv or "--help" in argv:
        plan_parser.print_help()
        print("\nand every flag of the chosen training script:\n")
    if plan.script not in ("tldr", "ultrafeedback"):
        raise SystemExit(f"error: --script must be 'tldr' or 'ultrafeedback', got {plan.script!r}")
    args_cls, presets = ((flags.TLDRArgs, flags.TLDR_PRESETS) if plan.script == "tldr"
                         else (flags.UltraFeedbackArgs, flags.ULTRAFEEDBACK_PRESETS))
    cfg, args = flags.parse_flags(args_cls, presets, rest)
    if issubclass(r2m.REWARD_MODES[cfg.reward].reward_model, brme.BRMEReward):
        raise SystemExit("error: memory_plan.py plans the R2M reward modes; BRME needs its heads fitted first")
    return PlanArgs(**vars(plan)), cfg, args


def model_config(explicit: Optional[str], model_name: str, flag: str) -> str:
    if explicit:
        path = explicit
    elif model_name in KNOWN_CONFIGS:
        path = os.path.join(CONFIG_DIR, KNOWN_CONFIGS[model_name])
    elif os.path.isfile(os.path.join(model_name, "config.json")):
        path = os.path.join(model_name, "config.json")
    else:
        raise SystemExit(f"error: no config known for {model_name!r}; pass --{flag} path/to/config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --{flag}: no such file {path!r}")
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    plan, cfg, args = parse(argv)
    policy_json = model_config(plan.policy_config, args.policy_model, "policy_config")
    reward_json = model_config(plan.reward_config, args.reward_model, "reward_config")
    # The longest prompt the script keeps: batches are padded to their longest, so this is the worst case.
    prompt_tokens = args.max_prompt_tokens
    build = config_builder(policy_json, reward_json, cfg.bf16)

    def run(c):
        t0 = time.perf_counter()
        result = simulate(c, build, prompt_tokens)
        print(f"  (simulated two steps in {time.perf_counter() - t0:.0f} s)", flush=True)
        return result

    header = (
        f"memory plan: {plan.script} --preset {args.preset}, reward {cfg.reward}, policy {os.path.basename(policy_json)} "
        f"(float32 + AdamW), reference and RM {os.path.basename(reward_json)} ({'float32' if cfg.bf16 is False else 'bf16'})\n"
        f"{cfg.queries_per_step} prompts x {cfg.group_size}, prompts {prompt_tokens} + {cfg.max_new_tokens} new tokens; "
        f"generation {cfg.generation_batch_size}, forward {cfg.forward_batch_size}, micro {cfg.micro_batch_size} "
        f"(minibatch {cfg.policy_minibatch_size}), RM minibatch {cfg.rm_minibatch_groups} groups; torch {torch.__version__}"
    )
    print(f"simulating two steps of r2m.train on fake tensors ({os.path.basename(policy_json)} policy) ...", flush=True)
    if plan.fit:
        budget = plan.gpu_memory_gib - plan.fit_reserve_gib
        flags_searched = [f.strip() for f in plan.fit_flags.split(",") if f.strip()]
        unknown = [f for f in flags_searched if f not in FIT_FLAGS]
        if unknown:
            raise SystemExit(f"error: --fit_flags: {unknown} are not among {list(FIT_FLAGS)}")
        print(f"--fit: {', '.join(flags_searched)} whose phases peak within {budget:.1f} GiB "
              f"({plan.gpu_memory_gib:.1f} - {plan.fit_reserve_gib:.1f} reserve)", flush=True)
        with FakeTensorMode(allow_non_fake_inputs=True), patched(torch.nn.Module, "_apply", _apply_by_set_data):
            layers = build()[0].config.num_hidden_layers
        cfg, result = fit(cfg, run, budget, flags_searched, layers)
        header = header.split("\n")[0] + "\n--fit chose: " + " ".join(f"--{f} {getattr(cfg, f)}" for f in flags_searched)
    else:
        result = run(cfg)
    lengths, label = read_prompt_lengths(plan.prompt_lengths, cfg.queries_per_step, prompt_tokens, cfg.seed)
    rates = flop_rates(build, cfg.d_attn)
    cost = step_cost(cfg, lengths, rates, seed=cfg.seed)
    before = step_cost(dataclasses.replace(cfg, generation_batch_size=64), lengths, rates, padded=True, seed=cfg.seed)
    print(report(result, cfg, plan.gpu_memory_gib, header, prompt_tokens, lengths,
                 cost_report(cost, before, cfg, lengths, label)))
    if plan.json_out:
        summary = lambda c: {"flops": c.flops, "seconds": {p: c.seconds(p) for p in COST_PHASES},  # noqa: E731
                             "padding": c.padding, "decode_steps": c.decode_steps, "step_seconds": c.step_seconds,
                             "run_days": c.step_seconds * cfg.total_steps / 86400}
        with open(plan.json_out, "w") as f:
            json.dump({"peaks": {str(step): step_peaks(result, step) for step in (1, 2)},
                       "before_rl": result["peaks"].get((0, BEFORE_RL)), "host": host_plan(result, cfg, lengths),
                       "kv_cache_bytes": result["kv_cache_bytes"], "verdict": verdict(result, plan.gpu_memory_gib)[2],
                       "cost": summary(cost), "cost_padded": summary(before),
                       "constants": {"flops_per_second": H100_FLOPS, "decode_step_seconds": DECODE_STEP_SECONDS}},
                      f, indent=1)
    return result


def read_prompt_lengths(spec: str, n: int, longest: int, seed: int) -> tuple[list[int], str]:
    """--prompt_lengths -> n lengths (none above the script's --max_prompt_tokens) and how to name them."""
    if os.path.isfile(spec):
        with open(spec) as f:
            lengths = [min(int(x), longest) for x in json.load(f)]
        return (lengths * n)[:n] if len(lengths) < n else lengths[:n], f"from {os.path.basename(spec)}"
    try:
        low, high = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"error: --prompt_lengths must be LOW:HIGH or a JSON file of lengths, got {spec!r}") from None
    if not 1 <= low <= high:
        raise SystemExit(f"error: --prompt_lengths {spec}: need 1 <= LOW <= HIGH")
    high = min(high, longest)
    return configs.prompt_lengths(n, min(low, high), high, seed), f"uniform on {min(low, high)}-{high}"


if __name__ == "__main__":
    main()
