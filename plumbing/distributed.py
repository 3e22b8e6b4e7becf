"""The same Algorithm 1 on N processes (`torchrun --nproc_per_node N train_tldr.py ...`), in one place.

Data-parallel over prompts: each rank takes n/N of a step's prompts (whole groups, so RLOO / GRPO / GRE
statistics never cross ranks), samples and scores them, and the updates average gradients over ranks.

    policy        FSDP2 (`fully_shard`): float32 master weights, gradients and AdamW state sharded N ways;
                  bf16 compute on GPU through `MixedPrecisionPolicy`. Gradients are averaged by FSDP's own
                  reduce-scatter.
    ref policy,   FSDP2 too, forward only. Choice: sharded rather than replicated. At the 8B dialogue preset a
    RM body       replicated bf16 copy of each is 16 GB per GPU; sharded 8 ways it is 2 GB, which leaves the
                  room for the generation KV cache and the unsharded policy (docs/scale.md).
                  They run only full-batch forwards, one all-gather per layer per forward, never per token.
    R2M head      (cross-attention + score head, or BRME's heads): small, replicated on every rank, made
                  equal at start by a broadcast from rank 0; its gradients are averaged by `average_gradients`.

Nothing here runs on one process: without torchrun `setup` returns (False, 0, 1, device) and every other
function is the identity (or the plain single-process call), so `python train_tldr.py` takes no
distributed code path at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def setup(device: str = "auto") -> tuple[bool, int, int, torch.device]:
    """(is_distributed, rank, world_size, device). Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) this
    joins the process group, once: NCCL for GPU tensors and gloo for CPU ones, one GPU per rank."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():  # plain python, or torchrun with 1
        return False, 0, 1, torch.device(("cuda" if use_cuda else "cpu") if device == "auto" else device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" (no index) now means this rank's GPU everywhere in r2m.py
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return True, dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


# Choice: how long a process waits in a collective before the run is declared hung. NCCL's default is 10 minutes,
# and the other ranks wait at the next collective while rank 0 alone writes a checkpoint: the 8B preset's is
# ~96 GB (float32 policy + AdamW state), minutes on a fast disk, more on a network one. An hour covers a save;
# a rank that fails mid-save stops every rank at once (`on_main_process`), so no healthy run waits that long.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def rank_and_world_size() -> tuple[int, int]:
    """(0, 1) on one process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    """True on rank 0 (and on a single process, also before the process group exists): the one that logs,
    writes metrics.jsonl and writes checkpoints."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, through tqdm so progress bars stay intact."""
    if is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def per_rank_config(cfg, world_size: int, reward_model_class: Optional[type] = None):
    """This rank's share of a step: n/N prompts, policy minibatches of size/N trajectories and GREBT
    minibatches of groups/N, so every optimiser step still sees the same number of trajectories in total
    and the number of optimiser steps per RL step is the one of a single process.

    Equal shares matter: a rank's loss is a mean over its sequences (groups for GREBT), and the average of
    per-rank means is the global mean only when every rank holds the same count. reward_model_class: the reward
    mode's class, whose `split_over_processes` flags must divide too and whose `one_process_only` refuses N > 1.
    Returns cfg itself on one process."""
    if world_size == 1:
        return cfg
    checks = [
        (cfg.queries_per_step, "--queries_per_step"),
        (cfg.policy_minibatch_size, "--policy_minibatch_size"),
        (cfg.rm_minibatch_groups, "--rm_minibatch_groups"),
    ] + [(getattr(cfg, flag), f"--{flag}") for flag in getattr(reward_model_class, "split_over_processes", ())]
    for value, flag in checks:
        if value % world_size:
            raise ValueError(f"{flag} {value} must be divisible by the number of processes ({world_size})")
    share = cfg.policy_minibatch_size // world_size
    if share % cfg.micro_batch_size:
        raise ValueError(
            f"--micro_batch_size {cfg.micro_batch_size} must divide each process's share of "
            f"--policy_minibatch_size ({cfg.policy_minibatch_size} / {world_size} = {share})"
        )
    if getattr(reward_model_class, "one_process_only", False):
        raise ValueError(f"--reward {cfg.reward} ({reward_model_class.__name__}) runs on one process only")
    return dataclasses.replace(
        cfg,
        queries_per_step=cfg.queries_per_step // world_size,
        policy_minibatch_size=share,
        rm_minibatch_groups=cfg.rm_minibatch_groups // world_size,
    )


def place_models(policy: nn.Module, ref_policy: nn.Module, reward_model: nn.Module, device: torch.device,
                 bf16_compute: bool) -> None:
    """Put the three models on `device`. On one process: moved whole. Under torchrun: FSDP2 over all ranks,
    each decoder layer its own unit (one all-gather per layer in a forward), then the rest of the model as the
    root unit. The RM is sharded at its body (`reward_model.reward_model.base_model`), which is what the loop
    calls; the trainable heads stay replicated and are broadcast from rank 0 so every rank starts from the same
    weights. A LoRA policy's reference (the same module, adapter off) owns no weights and is not sharded apart.

    Called on the models as loaded (in host memory, dtypes already set): `fully_shard` moves one unit at a time
    to `device` and keeps only this rank's shard there, so no GPU ever holds a whole model."""
    if not dist.is_initialized():
        for model in (policy, ref_policy, reward_model):
            model.to(device)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def shard(model: nn.Module, layer_names: set[str]) -> None:
        # float32 weights (what trains: the policy; the Pretrained RM's body) get bf16 all-gathers and compute and
        # float32 gradient reduction; frozen bf16 ones are gathered as they are stored
        float32 = any(p.dtype == torch.float32 for p in model.parameters())
        kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
            if (bf16_compute and float32) else {}
        for module in model.modules():
            if type(module).__name__ in layer_names:
                fully_shard(module, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)

    shard(policy, set(policy._no_split_modules or ()))
    if any(True for _ in ref_policy.parameters()):
        shard(ref_policy, set(ref_policy._no_split_modules or ()))
    rm = reward_model.reward_model
    shard(rm.base_model, set(rm._no_split_modules or ()))
    reward_model.to(device)  # the heads (the sharded body stays as it is)
    broadcast_parameters(replicated_parameters(reward_model))


def is_sharded(module: nn.Module) -> bool:
    """True for an FSDP2-sharded module (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def broadcast_parameters(parameters) -> None:
    """Make replicated parameters equal to rank 0's (no-op on one process)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


def replicated_parameters(reward_model: nn.Module) -> list[nn.Parameter]:
    """The reward model's own heads: every parameter outside the frozen RM it wraps."""
    body = {id(p) for p in reward_model.reward_model.parameters()}
    return [p for p in reward_model.parameters() if id(p) not in body]


def sum_over_ranks(x: float) -> float:
    """A number summed over ranks (the number itself on one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters that may mix FSDP shards (DTensors: a sharded RM body) with
    replicated tensors (its head): one global norm over all of them, the same number as on one process."""
    parameters = [p for p in parameters if p.grad is not None]
    if not dist.is_initialized():
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    from torch.distributed.tensor import DTensor

    groups = ([p.grad for p in parameters if isinstance(p.grad, DTensor)],
              [p.grad for p in parameters if not isinstance(p.grad, DTensor)])
    squares = 0.0
    for grads in groups:
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            squares += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    total = squares**0.5
    if total > max_norm:
        for grads in groups:
            for g in grads:
                g.mul_(max_norm / (total + 1e-6))
    return total


def average_gradients(parameters) -> None:
    """Average the gradients of replicated parameters over ranks (no-op on one process). Each rank's loss is
    a mean over the same number of groups, so this is the gradient of the global mean loss."""
    if not dist.is_initialized():
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if p.grad.is_cuda else dist.ReduceOp.SUM)
            if not p.grad.is_cuda:  # gloo has no AVG
                p.grad.div_(dist.get_world_size())


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Generation calls the policy once per new token. Under FSDP each call would all-gather every layer
    again; instead all-gather every unit once here, keep it gathered for the whole `generate`, reshard
    after. Memory: the full policy in its compute dtype (bf16 on GPU) for the duration. No-op on one process."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)  # layers free their gathered weights after each forward again
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps fully_shard's default for a root
        for unit in units:
            unit.reshard()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (N*b, ...), rank 0's rows first. The identity on one process."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(record: dict) -> dict:
    """A step's metrics averaged over ranks (the identity on one process). Every rank's figure is a mean over
    the same number of trajectories (or groups, or optimiser steps), so the average is the global mean."""
    if not dist.is_initialized():
        return record
    keys = [k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {**record, **{k: (record[k] if isinstance(record[k], int) else v) for k, v in zip(keys, values.tolist())}}


def decorrelate_rng() -> None:
    """After a resume every rank restored rank 0's saved generator state; give each rank its own stream,
    still determined by the checkpoint. No-op on one process (its resume stays exact)."""
    if dist.is_initialized():
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + dist.get_rank())


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if dist.is_initialized():
        dist.barrier()


def on_main_process(fn: Callable[[], object], error: type = RuntimeError) -> None:
    """Run fn on rank 0 alone, and let every rank know how it went: if it raises, rank 0 raises it and every other
    rank raises `error` with its message, so no rank is left waiting in a collective for one that stopped (a
    failed checkpoint write, a full disk). On one process: fn()."""
    if not dist.is_initialized():
        fn()
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - whatever stops rank 0 stops the run
            failure = e
    message = [None if failure is None else (str(failure).strip().splitlines() or [type(failure).__name__])[0]]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise error(f"rank 0 stopped the run: {message[0]}")


def full_state_dict(module: nn.Module) -> dict:
    """A module's full (unsharded) weights in host memory: under FSDP a collective (every rank must call it) whose
    tensors only rank 0 receives; on one process the module's own state dict, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load what `full_state_dict` returned into a plain or a sharded module; under FSDP only rank 0's copy is
    read (and broadcast), each rank keeping its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not dist.is_initialized():
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def policy_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) policy weights and its optimiser state keyed by parameter name. Under FSDP
    this is a collective (every rank must call it) and only rank 0 receives the tensors. The same format on
    one process, so a checkpoint resumes with any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # Under FSDP the gathered copy goes to rank 0's host memory; one process saves its tensors where they are.
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_model_state_dict(policy, options=options), get_optimizer_state_dict(policy, optimizer, options=options)


def load_policy_state(policy: nn.Module, optimizer: Optional[torch.optim.Optimizer], weights: dict,
                      optimizer_state: Optional[dict]) -> None:
    """Load what `policy_state` returned into a plain or a sharded policy (and its optimiser, when given).
    Under FSDP only rank 0's copy is read (the others may pass empty dicts): it is broadcast and each rank keeps
    its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(policy, weights, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(policy, optimizer, optimizer_state, options=options)


def teardown(wait: bool = True) -> None:
    """Leave the process group once training is over (no-op on one process). wait=False on an error: a rank that
    stops must not wait at a barrier for ranks that may be stuck elsewhere (torchrun ends them when it exits)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
        dist.destroy_process_group()
