"""LoRA for one-GPU runs of big policies (optional dependency: pip install peft).

    python train_ultrafeedback.py --lora_r 16                          # LLaMA3-8B-Instruct on one 80 GB GPU
    python train_ultrafeedback.py --lora_r 16 --merge_on_save true     # + a merged checkpoint/policy folder

Choice (the paper fine-tunes the whole policy): with --lora_r > 0 the policy trains a LoRA adapter
(W + (α/r)·B·A on the chosen linear layers, B = 0 at start so the first policy is exactly the SFT model) and
its base weights stay frozen. Three consequences, each handled here:
- The reference policy π_ref is the SAME module with the adapter switched off (`AdapterDisabledReference`):
  the frozen base weights ARE the SFT model, so no second copy of the policy is held in memory.
- R2M's hidden states h still come from the adapted policy's forwards: the capture hook sits on the LM head,
  which peft leaves in place, and the reference's forward runs outside the capture (r2m.rollout).
- A checkpoint holds the adapter (checkpoint/adapter/, what resume reads, a few MB); with --merge_on_save
  also checkpoint/policy/, the base with the adapter folded in: a plain Hugging Face folder that
  `from_pretrained` and eval_judge.py read like a fully fine-tuned policy.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

ADAPTER_DIR, MERGED_DIR = "adapter", "policy"


def add_lora(policy: nn.Module, r: int, alpha: float, target_modules: str) -> nn.Module:
    """Wrap a Hugging Face causal LM in a trainable LoRA adapter; its own weights are frozen in place.
    target_modules: 'all-linear' (every linear layer but the LM head) or comma-separated module names."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("error: --lora_r needs the peft package: pip install peft") from None
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    # Choice: no LoRA dropout. Dropout is off in every model: the PPO ratio must be exactly 1 before an update.
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(policy, config)
    except ValueError as e:  # e.g. a module name the model does not have
        raise SystemExit(f"error: --lora_target_modules {target_modules!r}: {e}".splitlines()[0]) from None


def is_lora(policy: nn.Module) -> bool:
    """True for a peft-wrapped policy (duck-typed, so callers need not import peft)."""
    return hasattr(policy, "peft_config") and hasattr(policy, "disable_adapter")


class AdapterDisabledReference(nn.Module):
    """π_ref of a LoRA policy: the policy's own forward with the adapter switched off.

    The policy is held as a plain attribute, NOT a registered submodule, so this module owns no parameters:
    whatever the loop does to "the reference" (devices.prepare_models casts it to the frozen dtype, freezes it with
    requires_grad_(False), switches it to eval) cannot reach the shared weights and freeze the adapter."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", policy)  # bypasses nn.Module's registration, on purpose (see above)

    @torch.no_grad()
    def forward(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy(**inputs)


@torch.no_grad()
def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + (α/r)·B·A), float32 on the CPU, under the
    base model's own parameter names. The policy is left untouched: merging in place and back would round the
    base weights, which are the reference policy."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    adapter = policy.active_adapter
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = weight.float() + module.get_delta_weight(adapter).float()
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")  # peft puts the original Linear under `base_layer`
        value = merged.get(key, value)
        state[key] = (value.float() if value.is_floating_point() else value).cpu()
    return state


def save_adapter(policy: nn.Module, tokenizer, folder: str, merge: bool) -> None:
    """folder/adapter: the adapter (+ tokenizer), which is all that trains; folder/policy only with `merge`."""
    policy.save_pretrained(os.path.join(folder, ADAPTER_DIR))
    targets = [os.path.join(folder, ADAPTER_DIR)]
    if merge:
        policy.get_base_model().save_pretrained(os.path.join(folder, MERGED_DIR), state_dict=merged_state_dict(policy))
        targets.append(os.path.join(folder, MERGED_DIR))
    if tokenizer is not None:
        for target in targets:
            tokenizer.save_pretrained(target)


def load_adapter(policy: nn.Module, folder: str) -> None:
    """Restore the adapter that `save_adapter` wrote to folder/adapter into a policy wrapped the same way."""
    path = os.path.join(folder, ADAPTER_DIR)
    if not is_lora(policy):
        raise SystemExit(f"error: {folder} holds a LoRA adapter (written with --lora_r); resume with the same "
                         "--lora_r or use another --output_dir")
    from peft import load_peft_weights, set_peft_model_state_dict

    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise SystemExit(f"error: {folder} holds no LoRA adapter (written without --lora_r); resume without "
                         "--lora_r or use another --output_dir")
    with open(os.path.join(path, "adapter_config.json")) as f:
        saved = json.load(f)
    current = policy.peft_config[policy.active_adapter]
    for key in ("r", "lora_alpha"):
        if saved[key] != getattr(current, key):
            raise SystemExit(f"error: {folder} was written with LoRA {key} = {saved[key]}, not {getattr(current, key)}; "
                             "resume with the same settings or use another --output_dir")
    result = set_peft_model_state_dict(policy, load_peft_weights(path, device="cpu"))
    misfits = list(result.unexpected_keys) + [k for k in result.missing_keys if ".lora_" in k]
    if misfits:
        raise SystemExit(f"error: {folder}'s adapter does not fit this policy (e.g. {misfits[0]}); "
                         "resume with the same --lora_target_modules")
