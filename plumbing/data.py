"""The data side of a run: data files and hub data sets, the policy's prompts (TL;DR's cut, chat templates), the
reward model's view of a trajectory, preference pairs, and padding them into batches. Used by the training scripts,
by `r2m.py` (padding, the RM's inputs, which prompts a step takes) and by the evaluation; imports nothing of the
project."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------------------------------
# Rows: local files and hub data sets
# ----------------------------------------------------------------------------------------------------


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


def response_text(x) -> str:
    """A response given as text, or as a chat (list of {role, content}) whose last message is the reply."""
    return x[-1]["content"] if isinstance(x, list) else str(x)


def step_prompt_indices(num_prompts: int, n: int, step: int, seed: int) -> list[int]:
    """Choice: step `step` takes the next n prompts of seeded permutations of the data set, one per pass.
    Deterministic in (seed, step), so a resumed run sees the prompts it would have seen."""
    out: list[int] = []
    while len(out) < n:
        epoch, offset = divmod(step * n + len(out), num_prompts)
        perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - len(out), num_prompts - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


# ----------------------------------------------------------------------------------------------------
# The policy's prompts
# ----------------------------------------------------------------------------------------------------


TLDR_SUFFIX = "TL;DR:"


def tokenize_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Prompt ids of at most max_tokens. A long post is truncated; the final 'TL;DR:' cue never is, because
    the policy was trained to write its summary right after it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    cut = text.rfind(TLDR_SUFFIX)
    head, tail = (text[:cut], text[cut:]) if cut >= 0 else (text, "")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][: max(0, max_tokens - len(tail_ids))]
    return head_ids + tail_ids


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The policy's input: the user turn in the policy's own chat template, ready for the assistant reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds any BOS


# ----------------------------------------------------------------------------------------------------
# Batches, and the reward model's view of a trajectory
# ----------------------------------------------------------------------------------------------------


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (masks, not pad ids, decide what is real)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> ids (B, L), mask (B, L). Left padding so every prompt ends at column L-1 and
    generation continues right after it."""
    L = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), L), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
    return ids, mask


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> ids (B, L), mask (B, L)."""
    L = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), L), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


RMView = Callable[[str, str], list[int]]  # (prompt text, response text) -> the RM's token ids


def make_rm_view(rm_tokenizer, render: Optional[Callable[[str, str], str]] = None) -> RMView:
    """How the RM reads a trajectory when it does not share the policy's tokenizer: the raw prompt text and
    the decoded response text, rendered by `render(prompt, response) -> text` (e.g. the RM's chat template)
    and tokenised by the RM's own tokenizer. Default render: prompt + response, then the RM's EOS token."""

    def rm_view(prompt: str, response: str) -> list[int]:
        if render is not None:
            return rm_tokenizer(render(prompt, response), add_special_tokens=False)["input_ids"]
        ids = rm_tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        return ids + ([rm_tokenizer.eos_token_id] if rm_tokenizer.eos_token_id is not None else [])

    return rm_view


def chat_render(rm_tokenizer) -> Callable[[str, str], str]:
    """How a chat RM reads a trajectory: (raw prompt, response text) as a two-turn chat in its own template."""

    def render(prompt: str, response: str) -> str:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return rm_tokenizer.apply_chat_template(chat, tokenize=False)

    return render


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (then the RM can reuse the policy's token ids)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def rm_inputs(tokenizer, query_responses: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
              response_mask: torch.Tensor, row_prompt_texts: Optional[list[str]], rm_view: Optional[RMView],
              rm_pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RM's view of each trajectory -> ids (N, S_rm), mask (N, S_rm): the same token ids when policy and RM
    share a tokenizer, otherwise the raw prompt text and the decoded response, re-tokenised by the RM (in its
    own chat template). row_prompt_texts: the raw prompt of each row."""
    if rm_view is None:
        return query_responses, attention_mask
    texts = tokenizer.batch_decode(
        [response_ids[i][response_mask[i].bool()] for i in range(len(response_ids))], skip_special_tokens=True
    )
    return pad_right([rm_view(row_prompt_texts[i], texts[i]) for i in range(len(texts))], rm_pad_id)


def preference_views(path: str, rm_view: RMView) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A preference file (JSON lines {prompt, chosen, rejected}; responses as texts or chats) in the RM's view
    -> chosen (ids, mask), rejected (ids, mask), each (M, S) right-padded."""
    rows = load_rows(path, "train", ["prompt", "chosen", "rejected"])
    return tuple(pad_right([rm_view(str(r["prompt"]), response_text(r[c])) for r in rows], 0) for c in ("chosen", "rejected"))
