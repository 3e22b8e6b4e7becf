"""What the training scripts share: flags with presets, data and model loading, one-line errors, building
the reward model for a reward mode, and the call into `r2m.train`.

Nothing algorithmic lives here (that is `r2m.py`); this module is the plumbing between a script's data and
models and the loop, so that `train_tldr.py` and `train_ultrafeedback.py` stay short and do not repeat
each other.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn as nn

import brme
import distributed
from r2m import (
    REWARD_MODES,
    FrozenRewardBody,
    R2MConfig,
    R2MRewardModel,
    RMView,
    has_checkpoint,
    make_rm_view,
    pad_token_id,
    resolve_device,
    train,
)

def parse_flags(script_args_cls, presets: dict[str, dict], argv: Optional[list[str]] = None):
    """Parse R2MConfig + a script's own dataclass with HfArgumentParser (help text = each field's `help`).
    `--preset NAME` swaps in that preset's defaults; flags given explicitly still win."""
    import argparse

    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="paper")
    chosen = pre.parse_known_args(argv)[0].preset
    if chosen not in presets:
        raise SystemExit(f"error: --preset must be one of {sorted(presets)}, got {chosen!r}")
    parser = HfArgumentParser((R2MConfig, script_args_cls))
    parser.set_defaults(**presets[chosen])
    cfg, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        cfg.validate()
        # --- distributed: each of torchrun's processes must get an equal share of a step (checked before loading) ---
        distributed.per_rank_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), REWARD_MODES[cfg.reward].train_body)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return cfg, args


def load_rows(dataset: str, split: str, columns: list[str]) -> list[dict]:
    """Rows of a Hugging Face data set (hub name) or of a local .json/.jsonl file, checked for `columns`."""
    from datasets import load_dataset

    try:
        if os.path.isfile(dataset) or dataset.endswith((".json", ".jsonl")):
            data = load_dataset("json", data_files=dataset, split="train")
        else:
            data = load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001 - the data set libraries raise many kinds; the user needs one line
        raise SystemExit(f"error: could not load data set {dataset!r} (split {split!r}): {type(e).__name__}: {e}")
    if len(data) == 0:
        raise SystemExit(f"error: data set {dataset!r} has no rows")
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise SystemExit(f"error: data set {dataset!r} has no column(s) {missing}; its columns are {data.column_names}")
    return [dict(row) for row in data]


def load_pretrained(policy_name: str, reward_model_name: str, cfg: R2MConfig):
    """The real models from the hub or local folders: policy (float32 master weights), reference policy and
    RM (bf16 on GPU), and both tokenizers. Any failure becomes one clear line."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    frozen = torch.bfloat16 if (cfg.bf16 and resolve_device(cfg.device).type == "cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_name)
        rm_tokenizer = AutoTokenizer.from_pretrained(reward_model_name)
        policy = AutoModelForCausalLM.from_pretrained(policy_name, dtype=torch.float32)
        ref_policy = AutoModelForCausalLM.from_pretrained(policy_name, dtype=frozen)
        rm = AutoModelForSequenceClassification.from_pretrained(reward_model_name, dtype=frozen, num_labels=1)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(
            f"error: could not load policy {policy_name!r} / reward model {reward_model_name!r}: {type(e).__name__}: {e}"
        )
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


def build_reward(cfg: R2MConfig, rm: nn.Module, policy: nn.Module, rm_view: RMView) -> FrozenRewardBody:
    """The one place where the reward mode picks the reward model's class (and BRME fits its heads)."""
    if REWARD_MODES[cfg.reward].ensemble:
        ensemble = brme.BRMEReward(rm, num_heads=cfg.brme_heads, lam=cfg.brme_lambda, seed=cfg.seed)
        if cfg.resume and has_checkpoint(cfg.output_dir):
            return ensemble  # the fitted heads come back with the checkpoint
        if not cfg.brme_preference_file:
            raise SystemExit("error: --reward brme needs --brme_preference_file (JSON lines: prompt, chosen, rejected)")
        brme.fit_brme_from_file(ensemble, cfg.brme_preference_file, rm_view, cfg)
        return ensemble
    d_policy = policy.get_output_embeddings().in_features
    return R2MRewardModel(rm, d_policy=d_policy, d_attn=cfg.d_attn)


def run(cfg: R2MConfig, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts: list[list[int]],
        prompt_texts: list[str], render: Optional[Callable[[str, str], str]] = None) -> list[dict]:
    """What both training scripts do once their data and models are loaded: choose how the RM reads a
    trajectory, build the reward model for the mode, train."""
    keep = [i for i, p in enumerate(prompts) if p]  # an empty prompt has nothing to condition on
    prompts, prompt_texts = [prompts[i] for i in keep], [prompt_texts[i] for i in keep]
    if not prompts:
        raise SystemExit("error: no non-empty prompts to train on")
    distributed.setup(cfg.device)  # --- distributed: under torchrun join the process group; nothing on one process ---
    rm_view = make_rm_view(rm_tokenizer, render)
    shares_ids = render is None and same_tokenizer(tokenizer, rm_tokenizer)
    reward_model = build_reward(cfg, rm, policy, rm_view)
    history = train(policy, ref_policy, reward_model, tokenizer, prompts, cfg, prompt_texts=prompt_texts,
                    rm_view=None if shares_ids else rm_view, rm_pad_id=pad_token_id(rm_tokenizer))
    distributed.teardown()  # --- distributed: leave the process group (nothing on one process) ---
    return history
