"""What the training scripts do once their flags are parsed (`launch/flags.py`): load the models with one-line
errors, build the reward model for the reward mode, read the preference pairs a mode is fitted on, add LoRA and a
tracker if asked, call `r2m.train`, and end with a summary of the run.

Nothing algorithmic lives here (that is `r2m.py`); this module is what sits between a script's data and models
and the loop, so that `train_tldr.py` and `train_ultrafeedback.py` stay short and do not repeat each other.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn

from launch import tracking
from launch.flags import RunOptions, write_run_config  # (its imports add the baselines' rows to r2m's tables)
from plumbing import data, devices, distributed, lora
from plumbing.checkpoints import TrainingError, has_checkpoint
from r2m import REWARD_MODES, FrozenRewardBody, R2MConfig, train


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


def build_reward(cfg: R2MConfig, rm: nn.Module, policy: nn.Module) -> FrozenRewardBody:
    """The reward model of the run's reward mode: the class its row of r2m.REWARD_MODES names, around the loaded RM."""
    return REWARD_MODES[cfg.reward].reward_model.build(rm, cfg, d_policy=policy.get_output_embeddings().in_features)


def preferences_to_fit(cfg: R2MConfig, rm_view: data.RMView):
    """The preference pairs a reward mode is fitted on before RL (BRME's heads, the Pretrained RM's fine-tuning),
    in the RM's view; None when it fits nothing, or when a resumed run has them fitted in its checkpoint."""
    fit_on = REWARD_MODES[cfg.reward].fit_on
    if not fit_on or (cfg.resume and has_checkpoint(cfg.output_dir)):
        return None
    return data.preference_views(getattr(cfg, fit_on), rm_view)


def run(cfg: R2MConfig, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts: list[list[int]],
        prompt_texts: list[str], render: Optional[Callable[[str, str], str]] = None,
        options: Optional[RunOptions] = None, task: str = "tldr") -> list[dict]:
    """What both training scripts do once their data and models are loaded: write the resolved config, choose
    how the RM reads a trajectory, build the reward model for the mode, add LoRA and a tracker if asked,
    train, and print a summary. options: the script's flags (a RunOptions), or None for a plain full
    fine-tuning run; task: the evaluation task of the summary's next command ('tldr' or 'ultrafeedback')."""
    options = options or RunOptions()
    # An empty prompt has nothing to condition on, even wrapped in a chat template (non-empty ids).
    keep = [i for i, p in enumerate(prompts) if p and prompt_texts[i].strip()]
    if len(keep) < len(prompts):
        print(f"dropped {len(prompts) - len(keep)} empty prompts")
    prompts, prompt_texts = [prompts[i] for i in keep], [prompt_texts[i] for i in keep]
    if not prompts:
        raise SystemExit("error: no non-empty prompts to train on")
    # --- distributed: rank 0 writes the run's config (every rank has it) ---
    config = write_run_config(cfg, options, os.path.join(cfg.output_dir, "config.json"), write=distributed.is_main_process())
    if options.lora_r:
        policy = lora.add_lora(policy, options.lora_r, options.lora_alpha, options.lora_target_modules)
        ref_policy = lora.AdapterDisabledReference(policy)  # any copy the script loaded is dropped here
    distributed.setup(cfg.device)  # --- distributed: under torchrun join the process group; nothing on one process ---
    rm_view = data.make_rm_view(rm_tokenizer, render)
    shares_ids = render is None and data.same_tokenizer(tokenizer, rm_tokenizer)
    reward_model = build_reward(cfg, rm, policy)
    preferences = preferences_to_fit(cfg, rm_view)
    tracker = tracking.make_tracker(options.report_to, cfg.output_dir, config)
    try:
        history = train(policy, ref_policy, reward_model, tokenizer, prompts, cfg, prompt_texts=prompt_texts,
                        rm_view=None if shares_ids else rm_view, rm_pad_id=data.pad_token_id(rm_tokenizer),
                        tracker=tracker, preferences=preferences)
        if distributed.is_main_process():  # --- distributed: rank 0 wrote metrics.jsonl and the checkpoint ---
            distributed.print0(summary(cfg, options, task))
        return history
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


def summary(cfg: R2MConfig, options: RunOptions, task: str) -> str:
    """The lines a finished run ends with: its steps, reward and KL from first to last step (of the whole run,
    from metrics.jsonl, whether or not it was resumed), where its files are, and what to run next."""
    import json

    out = cfg.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    first, last = records[0], records[-1]
    number = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731  (null: a non-finite value)
    checkpoint = os.path.join(out, "checkpoint")
    policy = os.path.join(checkpoint, "policy")
    if not has_checkpoint(out):
        where = "no checkpoint (--save_every 0)"
    elif os.path.isdir(policy):
        where = f"{checkpoint} (step {last['step']}; policy/ is a Hugging Face folder)"
    else:
        where = f"{checkpoint} (step {last['step']}; a LoRA adapter: --merge_on_save true also writes policy/)"
    if options is not None and getattr(options, "preset", "") == "tiny":  # offline: generate on held-out prompts
        from launch import tiny

        prompts = tiny.TLDR_TINY_TEST if task == "tldr" else tiny.ULTRAFEEDBACK_TINY
        prompts = os.path.relpath(prompts) if not os.path.relpath(prompts).startswith("..") else prompts
        judge = f"--dataset {prompts} --judge none --output_dir {os.path.join(out, 'eval')}"
    else:
        judge = "--api_model gpt-4"
    evaluate = f"python eval_judge.py --policy {policy} --task {task} {judge}   (docs/evaluation.md)"
    return "\n".join([
        f"done: {len(records)} steps (0-{last['step']}); reward {number(first['reward/mean'])} -> "
        f"{number(last['reward/mean'])} (first -> last step); KL to the reference {last['kl/sequence']:.3f} nats per "
        "response at the last step" if last["kl/sequence"] is not None else f"done: {len(records)} steps",
        f"  metrics:    {os.path.join(out, 'metrics.jsonl')}",
        f"  checkpoint: {where}",
        f"  plot it:    python plot_run.py {out} -o {os.path.join(out, 'curves.png')}",
        f"  evaluate:   {evaluate}" if os.path.isdir(policy) else "",
    ]).rstrip()

