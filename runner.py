"""What the training scripts share: flags with presets, data and model loading, one-line errors, building
the reward model for a reward mode, and the call into `r2m.train`.

Nothing algorithmic lives here (that is `r2m.py`); this module is the plumbing between a script's data and
models and the loop, so that `train_tldr.py` and `train_ultrafeedback.py` stay short and do not repeat
each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

import brme
import devices
import distributed
import lora
import tracking
from checkpoints import TrainingError, check_output_dir, has_checkpoint
from r2m import (
    REWARD_MODES,
    FrozenRewardBody,
    R2MConfig,
    R2MRewardModel,
    RMView,
    make_rm_view,
    pad_right,
    pad_token_id,
    train,
)


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


def write_run_config(cfg: R2MConfig, options, path: str) -> dict:
    """The run's resolved settings (every flag of R2MConfig and the script) as one flat JSON object, which
    `--config` reads back to repeat the run."""
    config = {**dataclasses.asdict(options), **dataclasses.asdict(cfg)}
    config.pop("config", None)
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
    if chosen == "tiny":  # the tiny preset builds its own models; a model flag beside it would be silently ignored
        given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
        ignored = [flag for flag in ("--policy_model", "--reward_model") if flag in given]
        if ignored:
            raise SystemExit(f"error: --preset tiny builds its own tiny models and cannot use {' / '.join(ignored)}; "
                             "drop it, or choose another --preset")
    parser = HfArgumentParser((R2MConfig, script_args_cls))
    parser.set_defaults(**presets[chosen])
    parser.set_defaults(**from_file)  # a config file overrides its preset's defaults; command-line flags win over both
    cfg, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        cfg.validate()
        for f in dataclasses.fields(args):  # the scripts' token caps: at least 1 (--lora_r etc. are checked below)
            value = getattr(args, f.name)
            if f.name.endswith("_tokens") and value < 1:
                raise ValueError(f"--{f.name} must be at least 1, got {value}")
        # --- distributed: each of torchrun's processes must get an equal share of a step (checked before loading) ---
        distributed.per_rank_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), REWARD_MODES[cfg.reward].train_body)
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


def read_json_rows(path: str) -> list[dict]:
    """The rows of a local JSON-lines file, or of a JSON file holding one list of objects; one-line errors."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"error: could not read data set {path!r}: {e.strerror or e}") from None
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise SystemExit(f"error: data set {path!r} is not JSON lines (or one JSON list): {e}") from None
    if any(not isinstance(row, dict) for row in rows):
        raise SystemExit(f"error: data set {path!r} holds a row that is not a JSON object")
    return rows


def load_rows(dataset: str, split: str, columns: list[str]) -> list[dict]:
    """Rows of a Hugging Face data set (hub name) or of a local .json/.jsonl file, checked for `columns`. A local
    file is read directly: `datasets` is needed for hub names only."""
    if os.path.isfile(dataset) or dataset.endswith((".json", ".jsonl")):
        rows = read_json_rows(dataset)
    else:
        try:
            from datasets import load_dataset
        except ImportError:
            raise SystemExit(f"error: data set {dataset!r} is a hub name, which needs the datasets package: "
                             "pip install datasets") from None
        try:
            rows = [dict(row) for row in load_dataset(dataset, split=split)]
        except Exception as e:  # noqa: BLE001 - the data set libraries raise many kinds; the user needs one line
            raise SystemExit(f"error: could not load data set {dataset!r} (split {split!r}): {type(e).__name__}: {e}")
    if not rows:
        raise SystemExit(f"error: data set {dataset!r} has no rows")
    names = list(rows[0])
    missing = [c for c in columns if c not in names]
    if missing:
        raise SystemExit(f"error: data set {dataset!r} has no column(s) {missing}; its columns are {names}")
    return rows


def load_pretrained(policy_name: str, reward_model_name: str, cfg: R2MConfig, reference: bool = True):
    """The real models from the hub or local folders: policy (float32 master weights), reference policy and
    RM (bf16 on GPU), and both tokenizers. Any failure becomes one clear line. reference=False (LoRA, whose
    reference is the policy itself with the adapter off) loads no second copy and returns None for it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    # bf16 as stored on the hub; from_pretrained keeps the rotary frequencies (buffers) in float32
    frozen = torch.bfloat16 if devices.on_for_cuda(cfg.bf16, devices.resolve_device(cfg.device)) else torch.float32

    def load(what: str, name: str, loader, **kwargs):
        where = f"{what.replace(' ', '_')} {name!r}"
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise SystemExit(f"error: could not load --{where}: the folder has no config.json, so it is not a "
                             "Hugging Face model folder")
        try:
            return loader.from_pretrained(name, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub, file and format errors: the user needs one line
            first = (str(e).strip().splitlines() or [""])[0]
            raise SystemExit(f"error: could not load {what} (--{where}): {type(e).__name__}: {first}")

    tokenizer = load("policy model", policy_name, AutoTokenizer)
    rm_tokenizer = load("reward model", reward_model_name, AutoTokenizer)
    policy = load("policy model", policy_name, AutoModelForCausalLM, dtype=torch.float32)
    ref_policy = load("policy model", policy_name, AutoModelForCausalLM, dtype=frozen) if reference else None
    rm, info = load("reward model", reward_model_name, AutoModelForSequenceClassification, dtype=frozen,
                    num_labels=1, output_loading_info=True)
    new_head = [k for k in info["missing_keys"] if k.startswith("score.")]
    if new_head:  # e.g. a causal LM's folder: its body loads, but the score head would be random
        raise SystemExit(f"error: --reward_model {reward_model_name!r} holds no trained score head ({new_head[0]} "
                         "would be newly initialised); it is not a scalar reward model")
    for tok in (tokenizer, rm_tokenizer):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # masks, not pad ids, decide what is real in this code
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = rm_tokenizer.pad_token_id
    return policy, ref_policy, rm, tokenizer, rm_tokenizer


def chat_render(rm_tokenizer) -> Callable[[str, str], str]:
    """How a chat RM reads a trajectory: (raw prompt, response text) as a two-turn chat in its own template."""

    def render(prompt: str, response: str) -> str:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return rm_tokenizer.apply_chat_template(chat, tokenize=False)

    return render


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (then the RM can reuse the policy's token ids)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def response_text(x) -> str:
    """A response given as text, or as a chat (list of {role, content}) whose last message is the reply."""
    return x[-1]["content"] if isinstance(x, list) else str(x)


def build_reward(cfg: R2MConfig, rm: nn.Module, policy: nn.Module) -> FrozenRewardBody:
    """The one place where the reward mode picks the reward model's class."""
    if REWARD_MODES[cfg.reward].ensemble:
        return brme.BRMEReward(rm, num_heads=cfg.brme_heads, lam=cfg.brme_lambda, seed=cfg.seed)
    d_policy = policy.get_output_embeddings().in_features
    reward_model = R2MRewardModel(rm, d_policy=d_policy, d_attn=cfg.d_attn, seed=cfg.seed)
    reward_model.save_body = REWARD_MODES[cfg.reward].pretrain  # its fine-tuned body is part of the run's state
    return reward_model


def preferences_to_fit(cfg: R2MConfig, rm_view: RMView):
    """The preference pairs a reward mode is fitted on before RL (BRME's heads, the Pretrained RM's fine-tuning),
    in the RM's view; None when it fits nothing, or when a resumed run has them fitted in its checkpoint."""
    mode = REWARD_MODES[cfg.reward]
    if not (mode.ensemble or mode.pretrain) or (cfg.resume and has_checkpoint(cfg.output_dir)):
        return None
    path = cfg.brme_preference_file if mode.ensemble else cfg.pretrain_rm_preference_file
    if not path:
        flag = "--brme_preference_file" if mode.ensemble else "--pretrain_rm_preference_file"
        raise SystemExit(f"error: --reward {cfg.reward} needs {flag} (JSON lines: prompt, chosen, rejected)")
    return preference_views(path, rm_view)


def preference_views(path: str, rm_view: RMView) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A preference file (JSON lines {prompt, chosen, rejected}; responses as texts or chats) in the RM's view
    -> chosen (ids, mask), rejected (ids, mask), each (M, S) right-padded."""
    rows = load_rows(path, "train", ["prompt", "chosen", "rejected"])
    return tuple(pad_right([rm_view(str(r["prompt"]), response_text(r[c])) for r in rows], 0) for c in ("chosen", "rejected"))


def run(cfg: R2MConfig, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts: list[list[int]],
        prompt_texts: list[str], render: Optional[Callable[[str, str], str]] = None,
        options: Optional[RunOptions] = None) -> list[dict]:
    """What both training scripts do once their data and models are loaded: write the resolved config, choose
    how the RM reads a trajectory, build the reward model for the mode, add LoRA and a tracker if asked,
    train. options: the script's flags (a RunOptions), or None for a plain full fine-tuning run."""
    options = options or RunOptions()
    # An empty prompt has nothing to condition on, even wrapped in a chat template (non-empty ids).
    keep = [i for i, p in enumerate(prompts) if p and prompt_texts[i].strip()]
    if len(keep) < len(prompts):
        print(f"dropped {len(prompts) - len(keep)} empty prompts")
    prompts, prompt_texts = [prompts[i] for i in keep], [prompt_texts[i] for i in keep]
    if not prompts:
        raise SystemExit("error: no non-empty prompts to train on")
    config = write_run_config(cfg, options, os.path.join(cfg.output_dir, "config.json"))
    if options.lora_r:
        policy = lora.add_lora(policy, options.lora_r, options.lora_alpha, options.lora_target_modules)
        ref_policy = lora.AdapterDisabledReference(policy)  # any copy the script loaded is dropped here
    distributed.setup(cfg.device)  # --- distributed: under torchrun join the process group; nothing on one process ---
    rm_view = make_rm_view(rm_tokenizer, render)
    shares_ids = render is None and same_tokenizer(tokenizer, rm_tokenizer)
    reward_model = build_reward(cfg, rm, policy)
    preferences = preferences_to_fit(cfg, rm_view)
    tracker = tracking.make_tracker(options.report_to, cfg.output_dir, config)
    try:
        return train(policy, ref_policy, reward_model, tokenizer, prompts, cfg, prompt_texts=prompt_texts,
                     rm_view=None if shares_ids else rm_view, rm_pad_id=pad_token_id(rm_tokenizer), tracker=tracker,
                     preferences=preferences)
    except TrainingError as e:
        raise SystemExit(f"error: {e}")
    except RuntimeError as e:  # torch's sampler met NaN/inf probabilities: finite weights whose outputs overflow
        if "probability tensor" not in str(e):
            raise
        raise SystemExit("error: the policy's sampling probabilities are not finite (its weights diverged); lower "
                         "--policy_lr and resume from the last good checkpoint with --resume true")
    except OSError as e:  # a write error on metrics.jsonl or a checkpoint's rename; the last checkpoint is whole
        raise SystemExit(f"error: {e}; the last complete checkpoint in {cfg.output_dir} is intact: fix this, then "
                         "continue with --resume true")
    finally:
        tracker.close()
        # --- distributed: leave the process group, at a barrier unless this rank stops on an error ---
        distributed.teardown(wait=sys.exc_info()[0] is None)
