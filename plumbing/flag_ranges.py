"""The loop's flags, each checked against its range, then against each other, before anything runs
(`r2m.R2MConfig.validate` calls `check_config`): one line naming the flag, its range and the value given. A number's
range check also rejects NaN and inf."""

from __future__ import annotations

import math
from typing import Collection, Optional


def check_ranges(cfg, at_least: dict[str, float], more_than: dict[str, float], within: dict[str, tuple[float, float]],
                 choices: dict[str, Collection[str]], finite_or_none: tuple[str, ...] = ()) -> None:
    """ValueError for the first flag of `cfg` (any object with those attributes) out of its range:
    at_least {name: lowest allowed}, more_than {name: a bound it must exceed}, within {name: (lo, hi)} inclusive,
    choices {name: allowed words}, finite_or_none: names that may be None but not NaN or inf."""
    for name, options in choices.items():
        value = getattr(cfg, name)
        if value not in options:
            raise ValueError(f"--{name} must be one of {sorted(options)}, got {value!r}")
    for name, lowest in {**at_least, **more_than}.items():
        value, strict = getattr(cfg, name), name in more_than
        if not (lowest < value if strict else lowest <= value) or not value < math.inf:  # `not lo <= x`: NaN too
            raise ValueError(f"--{name} must be a finite number {'>' if strict else '>='} {lowest:g}, got {value}")
    for name, (lo, hi) in within.items():
        value = getattr(cfg, name)
        if not lo <= value <= hi:
            raise ValueError(f"--{name} must lie in [{lo:g}, {hi:g}], got {value}")
    for name in finite_or_none:
        value: Optional[float] = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be finite, got {value}")


# The loop's numeric flags (r2m.R2MConfig): the lowest value each allows, a bound it must exceed, or an interval.
AT_LEAST = dict(total_trajectories=1, queries_per_step=1, group_size=1, max_new_tokens=1, policy_epochs=1,
                policy_minibatch_size=1, micro_batch_size=1, d_attn=1, rm_minibatch_groups=1, brme_heads=1,
                brme_epochs=1, generation_batch_size=1, forward_batch_size=1, save_every=0, sample_every=0,
                max_nonfinite_steps=1, rm_epochs=1, pretrain_rm_epochs=1, pretrain_rm_batch_size=1, pretrain_rm_lr=0.0,
                policy_lr=0.0, rm_lr=0.0, brme_lr=0.0, clip_eps=0.0, beta=0.0, brme_sigma_prior=0.0, checkpoint_layers=-1)
MORE_THAN = dict(max_grad_norm=0.0, temperature=0.0)
WITHIN = dict(alpha=(0.0, 1.0), omega_floor=(0.0, 1.0), brme_lambda=(0.0, 1.0))


def check_config(cfg, algos: dict, reward_modes: dict) -> None:
    """`r2m.R2MConfig.validate`: ValueError, one line saying what to change, for the first setting that cannot work:
    a flag out of its range, then flags that do not fit together. algos, reward_modes: r2m's tables of variants."""
    for name, table, adds in (("algo", algos, "remax, reinforce_pp"), ("reward", reward_modes, "r2m_noise, "
                              "pretrained_rm, r2m_full_rm and brme")):
        if getattr(cfg, name) not in table:
            raise ValueError(f"--{name} must be one of {sorted(table)}, got {getattr(cfg, name)!r} (the baselines' "
                             f"rows, {adds}, are added by `import baselines, brme`, as the scripts do)")
    check_ranges(cfg, AT_LEAST, MORE_THAN, WITHIN, choices=dict(grebt_pairs=("fresh", "annotated"),
                 lr_schedule=("linear", "constant")), finite_or_none=("missing_eos_penalty",))
    if cfg.group_size < algos[cfg.algo].min_group_size:
        raise ValueError(f"--group_size must be at least 2 for --algo {cfg.algo} (leave-one-out / group std), "
                         f"got {cfg.group_size}")
    if reward_modes[cfg.reward].train and cfg.group_size < 2:
        raise ValueError(f"--reward {cfg.reward} trains on within-group pairs (GREBT): --group_size must be >= 2, "
                         f"got {cfg.group_size}")
    if cfg.total_steps < 1:
        raise ValueError(f"--total_trajectories {cfg.total_trajectories} is less than one step of "
                         f"{cfg.trajectories_per_step} (= queries_per_step x group_size)")
    if cfg.trajectories_per_step % cfg.policy_minibatch_size:
        raise ValueError(f"--policy_minibatch_size {cfg.policy_minibatch_size} must divide n*K = "
                         f"{cfg.trajectories_per_step}")
    if cfg.policy_minibatch_size % cfg.micro_batch_size:
        raise ValueError(f"--micro_batch_size {cfg.micro_batch_size} must divide --policy_minibatch_size "
                         f"{cfg.policy_minibatch_size}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume true and --overwrite true exclude each other: continue the run, or replace it")
