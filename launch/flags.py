"""The scripts' flags: the loop's (`r2m.R2MConfig`) and each script's own, their presets, config files, and the
checks that turn a bad flag into one line before anything loads.

    train_tldr.py           TLDRArgs, TLDR_PRESETS           ('paper': the paper's TL;DR settings; 'tiny': offline)
    train_ultrafeedback.py  UltraFeedbackArgs, ULTRAFEEDBACK_PRESETS   ('paper': LLaMA3-8B; 'qwen'; 'tiny')

`parse_flags` reads them with transformers' HfArgumentParser. The loop's help texts are here (`LOOP_HELP`), beside
`r2m.R2MConfig` whose fields they describe; the scripts' own flags carry theirs in their fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import baselines  # noqa: F401  (ReMax, REINFORCE++, the noise ablation, Pretrained RM, whole RM: rows of r2m's tables)
import brme  # noqa: F401  (BRME: a row of r2m.REWARD_MODES)
from launch import tiny, tracking
from plumbing import distributed
from plumbing.checkpoints import TrainingError, check_output_dir
from r2m import REWARD_MODES, R2MConfig

# The help text of each of the loop's flags (r2m.R2MConfig's fields).
LOOP_HELP = dict(
    algo="Advantage estimator: 'rloo' (Eq. 1), 'grpo', 'remax' (greedy-response baseline) or 'reinforce_pp' "
         "(REINFORCE++: KL in the per-token reward, batch-normalised returns).",
    reward="Reward mode: 'vanilla' (frozen RM), 'r2m', 'r2m_frozen' (feedback path never trained), 'r2m_noise' (h "
           "replaced by Gaussian noise), 'iterative_head' (GREBT on the score head only), 'pretrained_rm' (RM body and "
           "head fine-tuned with BT before RL, then frozen), 'brme' (reward-robust ensemble), 'r2m_full_rm' (every RM "
           "parameter trains: the cost baseline). 'R2M w/o BT' / 'w/o GRE' are --alpha 1 / --alpha 0.",
    total_trajectories="Trajectories (query, response) in the whole run; sets T.",
    queries_per_step="n: prompts sampled per RL step.",
    group_size="K: responses sampled per prompt (>= 2).",
    max_new_tokens="Longest response, in policy tokens.",
    temperature="Sampling temperature (no top-k / top-p).",
    policy_lr="Policy AdamW learning rate (see --lr_schedule).",
    lr_schedule="Learning rates of policy and RM head over the T steps: 'linear' (decay to 0) or 'constant'.",
    policy_epochs="k: passes over a step's trajectories.",
    policy_minibatch_size="Trajectories per policy optimiser step (must divide n*K).",
    clip_eps="ε of the clipped ratio.",
    beta="β: weight of the per-token k3 KL to the reference.",
    max_grad_norm="Gradient-norm clip for policy and RM head.",
    missing_eos_penalty="If set, a response without EOS gets this reward instead of the RM's (off by default).",
    omega_floor="Ω: floor of the ω(t) schedule (Eq. 4).",
    alpha="α: GRE weight in GREBT (Eq. 7); 0 = w/o GRE, 1 = w/o BT.",
    d_attn="d: width of the cross-attention (Eq. 3).",
    rm_lr="AdamW learning rate of cross-attention + score head.",
    rm_minibatch_groups="Groups per GREBT optimiser step.",
    rm_epochs="GREBT passes over a step's groups (1 = the paper's single reward-model update).",
    grebt_pairs="Rewards that pick GREBT's (winner, loser) pair: 'fresh' (recomputed with the fresh h' of the last "
                "policy epoch, the paper's reading) or 'annotated' (this step's annotation-time rewards).",
    pretrain_rm_preference_file="Pretrained RM: JSON-lines {prompt, chosen, rejected} to fine-tune the RM on.",
    pretrain_rm_epochs="Pretrained RM: epochs over the preference pairs.",
    pretrain_rm_lr="Pretrained RM: AdamW learning rate (App. G.5: 1e-6).",
    pretrain_rm_batch_size="Pretrained RM: preference pairs per optimiser step.",
    brme_heads="BRME: number of Gaussian reward heads.",
    brme_lambda="BRME: λ in (1-λ)·r_nominal + λ·r_min.",
    brme_preference_file="BRME: JSON-lines file of {prompt, chosen, rejected} to train the heads.",
    brme_epochs="BRME: epochs over each head's bootstrap sample.",
    brme_lr="BRME: learning rate of the heads.",
    brme_sigma_prior="BRME: weight γ of the γ·(log σ)² prior that pulls each head's σ toward 1.",
    generation_batch_size="Sequences generated at once.",
    forward_batch_size="Sequences per no-grad forward (old/ref log-probs, RM scoring).",
    micro_batch_size="Sequences per policy forward/backward.",
    bf16="bf16 frozen models (reference, RM body) and bf16 autocast for what trains, float32 master weights; the same "
         "on CPU and GPU. Default: on for CUDA, off for CPU.",
    gradient_checkpointing="Recompute the policy's activations in backward. Default: on for CUDA (for --checkpoint_layers "
                           "of its layers), off for CPU; true: every layer, false: none.",
    checkpoint_layers="With --gradient_checkpointing at its default on CUDA: how many of the policy's decoder layers "
                      "recompute their activations in backward, the others keeping theirs (-1: all).",
    cache_weight_casts="With --bf16: the policy update's micro-batches of one optimiser step share one bf16 cast of "
                       "each float32 weight (a bf16 copy of the policy while they run); false: each casts its own.",
    device="'auto' (cuda if available), 'cuda', or 'cpu'.",
    seed="Seed for prompts order, sampling and init.",
    output_dir="Where metrics.jsonl and checkpoint/ go.",
    save_every="Write a checkpoint every N steps and at the end; 0 = never (benchmarks).",
    sample_every="Print a few (prompt, response, reward) every N steps.",
    resume="Continue the run in output_dir from its newest complete checkpoint.",
    overwrite="Start over in an output_dir that holds a run (deletes it).",
    max_nonfinite_steps="Stop after this many steps in a row with a non-finite reward, loss or gradient norm "
                        "(updates skipped).",
    merge_on_save="LoRA only: checkpoints also hold policy/, the policy with its adapter merged (a full model).",
)


def loop_flags() -> type:
    """r2m.R2MConfig's fields, each with its LOOP_HELP text, as the dataclass HfArgumentParser reads."""
    hints = typing.get_type_hints(R2MConfig)
    return dataclasses.make_dataclass("R2MFlags", [
        (f.name, hints[f.name], dataclasses.field(default=f.default, metadata={"help": LOOP_HELP[f.name]}))
        for f in dataclasses.fields(R2MConfig)])


@dataclass
class RunOptions:
    """Flags both scripts share that are about running, not the algorithm: config files, experiment tracking
    and LoRA. Each script's own flags dataclass extends this one."""

    config: Optional[str] = field(
        default=None,
        metadata={"help": "YAML or JSON file of flag values ({flag: value}); flags on the command line win, and "
                  "--preset defaults (also settable in the file) apply beneath it."},
    )
    report_to: str = field(
        default="none",
        metadata={"help": "Experiment tracker for metrics, config and samples: 'none', 'tensorboard' "
                  "(pip install tensorboard) or 'wandb' (pip install wandb; WANDB_MODE=offline needs no account)."},
    )
    lora_r: int = field(
        default=0, metadata={"help": "Rank of a LoRA adapter trained instead of the whole policy (pip install peft); "
                             "0 = full fine-tuning, as in the paper."}
    )
    # Choice (the paper fine-tunes the whole policy, so it gives no LoRA settings): α = 32 and every linear layer
    # but the LM head by default.
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA α: the adapter's update is scaled by α / r."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "LoRA: 'all-linear' (every linear layer but the LM head) or comma-separated module names."},
    )


def check_run_options(options: RunOptions, cfg: R2MConfig) -> None:
    """One clear line for run options that cannot work."""
    if options.report_to not in tracking.REPORT_TO:
        raise SystemExit(f"error: --report_to must be one of {', '.join(tracking.REPORT_TO)}, got {options.report_to!r}")
    if options.lora_r < 0:
        raise SystemExit(f"error: --lora_r must be >= 0 (0 = no LoRA), got {options.lora_r}")
    if cfg.merge_on_save and not options.lora_r:
        raise SystemExit("error: --merge_on_save needs --lora_r > 0 (without LoRA, checkpoint/policy is the full policy)")
    if options.lora_r and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # checked before anything loads
        raise SystemExit("error: --lora_r runs on one process only (LoRA is how a big policy fits one GPU); under "
                         "torchrun, train the whole policy (--lora_r 0), which FSDP shards across the GPUs")


def read_config_file(path: str, known: set[str]) -> dict:
    """{flag: value} from a YAML (.yaml/.yml) or JSON file, checked against the flags that exist."""
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml  # PyYAML comes with transformers

                values = yaml.safe_load(f)
            else:
                values = json.load(f)
    except (OSError, ValueError) as e:  # yaml's and json's parse errors are ValueErrors
        raise SystemExit(f"error: could not read --config {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of flag: value, got {type(values).__name__}")
    values.pop("config", None)  # a written config.json names no config file to read in turn
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: --config {path} sets unknown flag(s) {unknown}")
    return values


def write_run_config(cfg: R2MConfig, options, path: str, write: bool = True) -> dict:
    """The run's resolved settings (every flag of R2MConfig and the script) as one flat JSON object, which
    `--config` reads back to repeat the run; written to `path` when `write`."""
    config = {**dataclasses.asdict(options), **dataclasses.asdict(cfg)}
    config.pop("config", None)
    if write:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return config


def parse_flags(script_args_cls, presets: dict[str, dict], argv: Optional[list[str]] = None):
    """Parse R2MConfig + a script's own dataclass with HfArgumentParser (help text = each field's `help`).
    `--preset NAME` swaps in that preset's defaults; flags given explicitly still win."""
    import argparse

    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", default=None)
    known = pre.parse_known_args(argv)[0]
    flags = {f.name for cls in (R2MConfig, script_args_cls) for f in dataclasses.fields(cls)}
    from_file = read_config_file(known.config, flags) if known.config else {}
    chosen = known.preset or from_file.get("preset", "paper")
    if chosen not in presets:
        raise SystemExit(f"error: --preset must be one of {sorted(presets)}, got {chosen!r}")
    parser = HfArgumentParser((loop_flags(), script_args_cls))
    parser.set_defaults(**presets[chosen])
    parser.set_defaults(**from_file)  # a config file overrides its preset's defaults; command-line flags win over both
    loop, args = parser.parse_args_into_dataclasses(args=argv)
    cfg = R2MConfig(**dataclasses.asdict(loop))
    try:
        cfg.validate()
        fit_on = REWARD_MODES[cfg.reward].fit_on
        if fit_on and not getattr(cfg, fit_on):  # the preference pairs a mode is fitted on before RL
            raise ValueError(f"--reward {cfg.reward} needs --{fit_on} (JSON lines: prompt, chosen, rejected)")
        for f in dataclasses.fields(args):  # the scripts' token caps: at least 1 (--lora_r etc. are checked below)
            value = getattr(args, f.name)
            if f.name.endswith("_tokens") and value < 1:
                raise ValueError(f"--{f.name} must be at least 1, got {value}")
        # --- distributed: each of torchrun's processes must get an equal share of a step (checked before loading) ---
        distributed.per_rank_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), REWARD_MODES[cfg.reward].reward_model)
        check_output_path(cfg.output_dir)
        check_output_dir(cfg)
    except (ValueError, TrainingError) as e:
        raise SystemExit(f"error: {e}")
    if isinstance(args, RunOptions):
        check_run_options(args, cfg)
    return cfg, args


def check_output_path(output_dir: str) -> None:
    """--output_dir must be, or be creatable as, a folder."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir {output_dir!r} cannot be a folder: {existing!r} is a file")


# ----------------------------------------------------------------------------------------------------
# The two scripts' own flags and presets
# ----------------------------------------------------------------------------------------------------


@dataclass
class TLDRArgs(RunOptions):  # + --config, --report_to, --lora_* (RunOptions)
    preset: str = field(default="paper", metadata={"help": "'paper' (the paper's TL;DR settings) or 'tiny' (offline CPU smoke run)."})
    policy_model: str = field(
        default="trl-lib/pythia-2.8b-deduped-tldr-sft", metadata={"help": "SFT policy: hub name or local folder."}
    )
    reward_model: str = field(
        default="trl-lib/pythia-2.8b-deduped-tldr-rm", metadata={"help": "Scalar reward model: hub name or local folder."}
    )
    dataset: str = field(default="trl-lib/tldr", metadata={"help": "Prompts: hub data set or a local .jsonl file."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub data set."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (ends in 'TL;DR:')."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Cap on prompt length; the post is cut, never 'TL;DR:'."})


TLDR_PRESETS = {
    "paper": {},
    # The same code path, fully offline, on a CPU: a tiny GPT-NeoX "SFT" policy and a tiny trained RM shipped in
    # data/tiny_models/ (launch/tiny.py builds them: the RM prefers some adjectives to others), the shipped
    # synthetic prompt file. Choice: lr 5e-4 and β 0.1 over 16 steps: the reward rises by 0.5-1.3 standard
    # deviations while the KL to the reference stays near 1 nat (under 1.3 over seeds 0-4).
    "tiny": dict(
        policy_model=tiny.TINY_MODEL_FOLDERS["tldr_policy"], reward_model=tiny.TINY_MODEL_FOLDERS["tldr_reward_model"],
        dataset=tiny.TLDR_TINY, queries_per_step=8, group_size=4, total_trajectories=8 * 4 * 16, max_new_tokens=4,
        policy_lr=5e-4, beta=0.1, rm_lr=1e-3, d_attn=32, policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=32,
        generation_batch_size=32, rm_minibatch_groups=4, save_every=4, sample_every=4, device="cpu",
        output_dir="runs/tiny_tldr", max_prompt_tokens=128,
        brme_preference_file=tiny.PREFERENCES_TINY, brme_epochs=10, brme_lr=3e-2,
        pretrain_rm_preference_file=tiny.PREFERENCES_TINY, pretrain_rm_epochs=2, pretrain_rm_lr=1e-3,
    ),
}


@dataclass
class UltraFeedbackArgs(RunOptions):  # + --config, --report_to, --lora_* (RunOptions)
    preset: str = field(default="paper", metadata={"help": "'paper' (LLaMA3-8B-Instruct), 'qwen' (Qwen2.5-3B-Instruct) or 'tiny'."})
    policy_model: str = field(default="meta-llama/Meta-Llama-3-8B-Instruct", metadata={"help": "Chat policy: hub name or folder."})
    reward_model: str = field(default="Skywork/Skywork-Reward-V2-Llama-3.1-8B", metadata={"help": "Scalar chat RM: hub name or folder."})
    dataset: str = field(default="HuggingFaceH4/ultrafeedback_binarized", metadata={"help": "UltraFeedback: hub data set or local .jsonl."})
    dataset_split: str = field(default="train_prefs", metadata={"help": "Split of a hub data set."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the user prompt (text)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the chosen reply (chat or text)."})
    max_chosen_tokens: int = field(default=512, metadata={"help": "Drop rows whose chosen reply is longer (policy tokens)."})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "Drop rows whose templated prompt is longer."})


# Choice: 512 trajectories per step in minibatches of 128 (4 optimiser steps per epoch); the paper gives
# the step size, not the minibatch.
ULTRAFEEDBACK_PAPER = dict(queries_per_step=64, group_size=8, total_trajectories=51_200, max_new_tokens=512, temperature=0.7,
             policy_epochs=2, policy_lr=1e-6, omega_floor=0.6, rm_lr=1e-6, policy_minibatch_size=128,
             micro_batch_size=4, forward_batch_size=8, generation_batch_size=64, checkpoint_layers=-1,
             cache_weight_casts=False, output_dir="runs/r2m_ultrafeedback")

ULTRAFEEDBACK_PRESETS = {
    "paper": ULTRAFEEDBACK_PAPER,
    # Choice: micro-batches of 1 on the 3B policy: with the paper preset's 4 the memory plan predicts less than the
    # 10 GiB margin to spare on 80 GB (its figures: docs/scale.md); the updates are the same.
    "qwen": {**ULTRAFEEDBACK_PAPER, "policy_model": "Qwen/Qwen2.5-3B-Instruct", "policy_lr": 6e-6, "omega_floor": 0.7, "micro_batch_size": 1},
    "tiny": dict(  # as TL;DR's: a tiny Llama-style chat policy, and an RM of another tokenizer and chat format
        policy_model=tiny.TINY_MODEL_FOLDERS["chat_policy"], reward_model=tiny.TINY_MODEL_FOLDERS["chat_reward_model"],
        dataset=tiny.ULTRAFEEDBACK_TINY, dataset_split="train", queries_per_step=8, group_size=4,
        total_trajectories=8 * 4 * 16, max_new_tokens=4, policy_lr=5e-4, beta=0.1, rm_lr=1e-3, d_attn=32,
        policy_minibatch_size=16, micro_batch_size=8, forward_batch_size=32, generation_batch_size=32,
        rm_minibatch_groups=4, save_every=4, sample_every=4, device="cpu", output_dir="runs/tiny_ultrafeedback",
        max_chosen_tokens=64, max_prompt_tokens=128, brme_preference_file=tiny.ULTRAFEEDBACK_TINY,
        brme_epochs=10, brme_lr=3e-2,
        pretrain_rm_preference_file=tiny.ULTRAFEEDBACK_TINY, pretrain_rm_epochs=2, pretrain_rm_lr=1e-3,
    ),
}
