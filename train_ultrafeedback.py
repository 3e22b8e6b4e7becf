"""R2M on dialogue: UltraFeedback prompts, a chat policy and the Skywork reward model (the paper's second task, §5).

    python train_ultrafeedback.py                          # LLaMA3-8B-Instruct policy (lr 1e-6, Ω = 0.6)
    python train_ultrafeedback.py --preset qwen            # Qwen2.5-3B-Instruct policy (lr 6e-6, Ω = 0.7)
    python train_ultrafeedback.py --reward brme --brme_preference_file prefs.jsonl
    python train_ultrafeedback.py --preset tiny            # offline, CPU, the shipped tiny chat models (README)
    torchrun --nproc_per_node 8 train_ultrafeedback.py     # the 8B preset on 8 GPUs (docs/scale.md)

The policy reads each prompt through its own chat template; the RM (Skywork-Reward-V2-Llama-3.1-8B) reads the
raw prompt and the decoded response through *its* chat template and tokenizer. Policy and RM differ in
tokenizer and hidden size: R2M's cross-attention is what bridges them. All training logic is r2m.py's; this
script's flags and presets (`UltraFeedbackArgs`, `ULTRAFEEDBACK_PRESETS`) are in launch/flags.py.
"""

from __future__ import annotations

import os

# A run grows and frees the generation cache every step at a new prompt length: expandable segments keep the CUDA
# allocator from fragmenting over 122 steps. Set before CUDA starts; a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from launch import runner  # noqa: E402
from launch.flags import ULTRAFEEDBACK_PRESETS, UltraFeedbackArgs, parse_flags  # noqa: E402  (this script's flags and presets)
from plumbing import data  # noqa: E402


def main(argv=None) -> list[dict]:
    cfg, args = parse_flags(UltraFeedbackArgs, ULTRAFEEDBACK_PRESETS, argv)
    rows = data.load_rows(args.dataset, args.dataset_split, [args.prompt_column, args.chosen_column])
    policy, ref_policy, rm, tokenizer, rm_tokenizer = runner.load_pretrained(
        args.policy_model, args.reward_model, cfg, reference=not args.lora_r)  # LoRA: π_ref is the policy itself
    texts, prompts = [], []
    for row in rows:
        chosen = tokenizer(data.response_text(row[args.chosen_column]), add_special_tokens=False)["input_ids"]
        ids = data.chat_prompt_ids(tokenizer, str(row[args.prompt_column]))
        # the paper drops rows whose chosen reply is long (§5); Choice: also those whose templated prompt is long
        if len(chosen) <= args.max_chosen_tokens and len(ids) <= args.max_prompt_tokens:
            texts.append(str(row[args.prompt_column]))
            prompts.append(ids)
    print(f"{len(prompts)} of {len(rows)} prompts kept (chosen reply <= {args.max_chosen_tokens} tokens, "
          f"prompt <= {args.max_prompt_tokens} tokens)")
    return runner.run(cfg, policy, ref_policy, rm, tokenizer, rm_tokenizer, prompts, texts, render=data.chat_render(rm_tokenizer),
                      options=args, task="ultrafeedback")


if __name__ == "__main__":
    main()
