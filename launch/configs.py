"""Model configs from config files: the one place that turns a `config.json` (the real models' public sizes in
benchmarks/configs/, or a model folder's) into a transformers config object, whole or cut to a tiny size; and the
TL;DR prompt lengths that planning and the GPU check draw.

The memory plan builds its models at their real sizes from it; the GPU check builds Pythia-2.8B from it, and its
rehearsal on a CPU runs the same code with every shipped config cut to a tiny size *after* the real config object
is built, so a file that cannot become a model fails on the CPU first, not on a rented GPU.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs")

# The tiny cut: 2 layers of width 64 with 4 heads of 16 dimensions, a 1024-token vocabulary.
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=1024)


def shipped_configs() -> list[str]:
    """The config files in benchmarks/configs/, sorted."""
    return sorted(os.path.join(CONFIG_DIR, name) for name in os.listdir(CONFIG_DIR) if name.endswith(".json"))


def model_config(path: str, tiny: bool = False, num_labels: Optional[int] = None):
    """A config file -> its transformers config (`AutoConfig.for_model` on the file's keys), with one-line errors.

    tiny: cut to TINY after the real object is built (`cut_to_tiny`). num_labels: set it (1 for a scalar RM)."""
    from transformers import AutoConfig

    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not read model config {path!r}: {e}") from None
    if not isinstance(spec, dict) or "model_type" not in spec:
        raise SystemExit(f"error: model config {path!r} has no model_type")
    spec.pop("transformers_version", None)
    try:
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"error: model config {path!r}: {type(e).__name__}: {e}") from None
    if num_labels is not None:
        config.num_labels = num_labels
    if config.pad_token_id is None:  # the loop pads with 0 where a model names no pad token; masks say what is real
        config.pad_token_id = 0
    return cut_to_tiny(config) if tiny else config


def cut_to_tiny(config):
    """The same architecture at the TINY size, the head structure kept valid: as many query heads per key/value head
    as the real model where that divides (grouped-query attention stays grouped), an explicit head_dim and per-layer
    lists (Qwen2's layer_types) cut to match, and the rotary fraction kept (its dimensions even)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads_per_kv = config.num_attention_heads // kv_heads
    for key, value in TINY.items():
        setattr(config, key, value)
    if getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = max(1, TINY["num_attention_heads"] // heads_per_kv)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = head_dim
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: TINY["num_hidden_layers"]]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, TINY["num_hidden_layers"])
    for name in ("bos_token_id", "eos_token_id"):  # ids of the real vocabulary fall outside the tiny one
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= TINY["vocab_size"]:
            setattr(config, name, TINY["vocab_size"] - 1)
    rotary_dims = int(head_dim * _rotary_fraction(config))
    if rotary_dims % 2 or TINY["num_attention_heads"] % (getattr(config, "num_key_value_heads", None) or 1):
        raise ValueError(f"cutting {config.model_type} to a tiny size leaves {rotary_dims} rotary dimensions per "
                         f"head or heads that do not group into {config.num_key_value_heads} key/value heads")
    return config


def _rotary_fraction(config) -> float:
    """The fraction of each head's dimensions that rotate (GPT-NeoX: 0.25; Llama, Qwen: all)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("partial_rotary_factor", getattr(config, "rotary_pct", None) or 1.0)


# TL;DR's prompts under the Pythia tokenizer (cleanrl's preprocessing of the OpenAI TL;DR data, its published
# statistics): mean 346.7 tokens, median 352, max 512. A uniform draw on 181..512 has the same mean and maximum; the
# memory plan counts a step's work, and the GPU check measures one, on prompts of these lengths.
TLDR_PROMPT_LENGTHS = (181, 512)


def prompt_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    """n prompt lengths drawn uniformly from low..high (inclusive), the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]
