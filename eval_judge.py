"""Judge-based evaluation, as the R2M paper measures it (its §5 and Tables 1-3).

1. Generate (optional): a policy (hub name, or the `checkpoint/policy` folder a training run wrote) writes
   responses for the evaluation prompts -> responses.jsonl. Or pass --responses with ones already made.
2. Judge each response against its reference with one of three judges (or --judge none: generate only):
     api  any OpenAI-compatible chat-completions endpoint (key from an environment variable; `openai` package)
     hf   a local Hugging Face causal LM, comparing its probability of answering "A" vs "B"
     rm   a reward model scoring both (the vanilla RM, or an R2M reward model with policy feedback)
3. Report: win rate (ties count half), ties / unparseable / failed counted separately, 95% Wilson interval;
   judgments.jsonl (one line per example, appended as they arrive) and summary.json.
Tasks: tldr, ultrafeedback (pairwise against references, as above); alpaca_eval (AlpacaEval 2's instructions ->
model_outputs.json for the `alpaca_eval` package, which computes LC / raw win rates); mt_bench (MT-Bench's
two-turn questions, each answer graded 1-10 by the api judge).
Plus --mode rm_accuracy: on a preference file, the fraction with r(chosen) > r(rejected), for the vanilla RM
and for the R2M reward model with feedback from a policy (ω at t = T).

    python eval_judge.py --policy runs/r2m/checkpoint/policy --judge api --api_model gpt-4o
    python eval_judge.py --task ultrafeedback --policy runs/r2m_ultrafeedback/checkpoint/policy --judge hf --judge_model Qwen/Qwen2.5-7B-Instruct
    python eval_judge.py --mode rm_accuracy --preference_file prefs.jsonl --judge_model trl-lib/pythia-2.8b-deduped-tldr-rm --r2m_checkpoint runs/r2m/checkpoint

Re-running with the same --output_dir skips every example already judged by the same judge (failed ones are
tried again), so an interrupted run resumes at no extra cost.

Exit status: 0 every example judged (unparseable ones are counted, not failures); 1 a one-line error (bad input,
an endpoint that rejects the key / model / URL or redirects, or --max_consecutive_failures examples in a row
that failed every retry); 2 bad flags; 3 the run finished but some examples failed (a re-run retries them).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import r2m
from launch.api_client import ChatClient, JudgeFailed, api_key
from plumbing import data, devices

# ----------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    mode: str = field(default="judge", metadata={"help": "'judge' (win rate vs references) or 'rm_accuracy'."})
    task: str = field(default="tldr", metadata={"help": "'tldr' (summaries), 'ultrafeedback' (dialogue), 'alpaca_eval' (AlpacaEval 2 outputs) or 'mt_bench'."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where responses, judgments and summary go."})
    # --- 1. generation ---------------------------------------------------------------------------------
    policy: Optional[str] = field(default=None, metadata={"help": "Policy to generate with (hub name or folder); omit to use --responses."})
    responses: Optional[str] = field(default=None, metadata={"help": "Existing responses (.jsonl: id, prompt, response[, reference])."})
    dataset: Optional[str] = field(default=None, metadata={"help": "Evaluation prompts: hub data set or .jsonl (default per task); alpaca_eval: a local alpaca_eval.json; mt_bench: a local question.jsonl."})
    dataset_split: Optional[str] = field(default=None, metadata={"help": "Split (default: 'test' for tldr, 'test_prefs' for ultrafeedback)."})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "Column holding the prompt (default: 'prompt'; 'instruction' for alpaca_eval)."})
    reference_column: Optional[str] = field(default=None, metadata={"help": "Column holding the reference (default: 'completion' / 'chosen')."})
    references: Optional[str] = field(default=None, metadata={"help": "Separate reference file: .jsonl (id, reference) or alpaca_eval JSON (instruction, output)."})
    limit: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    temperature: Optional[float] = field(default=None, metadata={"help": "Sampling temperature for generation; 0 = greedy (default per task: 0 for tldr / ultrafeedback, 0.7 for alpaca_eval / mt_bench)."})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "Longest generated response (default per task: 53 tldr, 512 ultrafeedback, 2048 alpaca_eval, 1024 mt_bench)."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Prompt cap (TL;DR keeps its 'TL;DR:' suffix)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated / scored at once."})
    generator_name: Optional[str] = field(default=None, metadata={"help": "Name written as alpaca_eval's 'generator', the leaderboard row (default: the run's folder name, e.g. 'r2m' for runs/r2m/checkpoint/policy)."})
    # --- 2. judging ------------------------------------------------------------------------------------
    judge: Optional[str] = field(default=None, metadata={"help": "'api', 'hf', 'rm' or 'none' (generate only). Default: 'none' for alpaca_eval, 'api' otherwise."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "hf: judge LM; rm / rm_accuracy: the reward model (hub name or folder)."})
    api_base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible base URL (…/v1)."})
    api_model: str = field(default="gpt-4o", metadata={"help": "Model name sent to the API."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the API key (never printed or written)."})
    api_timeout: float = field(default=60.0, metadata={"help": "Seconds one API call may take in all (connect, send, wait, read) before it counts as timed out."})
    max_retries: int = field(default=5, metadata={"help": "Retries per example on HTTP 408/409/429/5xx, network errors, timeouts or malformed replies; then it is recorded as failed."})
    retry_backoff: float = field(default=2.0, metadata={"help": "First retry delay in seconds; doubles each retry (a server's Retry-After replaces it)."})
    retry_after_cap: float = field(default=60.0, metadata={"help": "Longest wait in seconds honoured from a server's Retry-After header."})
    max_consecutive_failures: int = field(default=3, metadata={"help": "Stop the run after this many examples in a row failed every retry (the endpoint looks down); 0 = never."})
    r2m_checkpoint: Optional[str] = field(default=None, metadata={"help": "rm judge / rm_accuracy: a training checkpoint/ folder; adds the R2M head with feedback from its policy."})
    preference_file: Optional[str] = field(default=None, metadata={"help": "rm_accuracy: .jsonl or hub data set with prompt, chosen, rejected (hub split: --dataset_split, default train)."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-example A/B order (and of sampling)."})
    device: str = field(default="auto", metadata={"help": "'auto', 'cuda' or 'cpu'."})


# Choice (generation settings): the paper gives no decoding settings for its evaluations that we could read.
# Pairwise tasks decode greedily (deterministic, the policy's most likely answer). AlpacaEval 2 and MT-Bench
# sample at 0.7, the paper's dialogue sampling temperature (§5), with room for long answers: 2048 new
# tokens (AlpacaEval's own reference generations are capped there) and 1024 per turn (FastChat's MT-Bench cap).
TASK_DEFAULTS = {
    "tldr": {"dataset": "trl-lib/tldr", "dataset_split": "test", "reference_column": "completion", "prompt_column": "prompt",
             "judge": "api", "temperature": 0.0, "max_new_tokens": 53},
    "ultrafeedback": {"dataset": "HuggingFaceH4/ultrafeedback_binarized", "dataset_split": "test_prefs",
                      "reference_column": "chosen", "prompt_column": "prompt", "judge": "api", "temperature": 0.0, "max_new_tokens": 512},
    "alpaca_eval": {"dataset": None, "dataset_split": "eval", "reference_column": "output", "prompt_column": "instruction",
                    "judge": "none", "temperature": 0.7, "max_new_tokens": 2048},
    "mt_bench": {"dataset": None, "dataset_split": "train", "reference_column": None, "prompt_column": None,
                 "judge": "api", "temperature": 0.7, "max_new_tokens": 1024},
}

# ----------------------------------------------------------------------------------------------------
# Judge prompts (our own wording of the DPO paper's TL;DR comparison prompt) and verdict parsing
# ----------------------------------------------------------------------------------------------------

TLDR_JUDGE_PROMPT = """You are comparing two summaries of the same forum post.

Post:
{prompt}

Summary A:
{a}

Summary B:
{b}

Which summary states the post's important points more precisely and more concisely, leaving out what does not
matter? Give one sentence of comparison first. Then, on its own last line, write "Preferred:" followed by A or B.

Comparison:"""

DIALOGUE_JUDGE_PROMPT = """You are comparing two assistant replies to the same user message.

User message:
{prompt}

Reply A:
{a}

Reply B:
{b}

Which reply is more helpful, correct and harmless for the user? Give one sentence of comparison first. Then, on
its own last line, write "Preferred:" followed by A or B.

Comparison:"""

VERDICT_LINE = re.compile(r"preferred[\s*_`'\"]*:([^\n]*)", re.IGNORECASE)  # "Preferred:", "**Preferred**:", ...
SIDE_LABELS = {"summary", "reply", "response", "option", "answer", "assistant", "output"}


def parse_verdict(text: str) -> Optional[str]:
    """'A', 'B' or None (unparseable). The last 'Preferred:' line counts, so a judge may reason before it.
    Decorations of a clear answer are accepted ('**B**', '"b"', '(A)', 'Summary B', 'Reply A.'); an answer that
    names both sides ('A or B') or neither ('Both', 'Neither', 'none') is unparseable, never guessed."""
    lines = VERDICT_LINE.findall(text or "")
    if not lines:
        return None
    words = re.findall(r"[A-Za-z]+", lines[-1])
    if words and words[0].lower() in SIDE_LABELS:
        words = words[1:]
    if not words or words[0].upper() not in ("A", "B"):
        return None
    letter = words[0].upper()
    other = "B" if letter == "A" else "A"
    # the other side named as a capital letter (lower-case 'a' is the article) after the answer: both named
    return None if other in words[1:] or (other == "B" and "b" in words[1:]) else letter


def policy_outcome(letter: Optional[str], policy_is_a: bool) -> str:
    """Un-flip the randomised order: 'win' / 'loss' for the policy, or 'unparseable'."""
    if letter is None:
        return "unparseable"
    return "win" if (letter == "A") == policy_is_a else "loss"


def policy_is_a(seed: int, example_id: str) -> bool:
    """Which side the policy's response is shown on: a fixed coin per (seed, example), whatever the order of
    evaluation or resumption."""
    return random.Random(f"{seed}:{example_id}").random() < 0.5


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (successes may be fractional: ties count half)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(records: list[dict]) -> dict:
    """Win rate over the decided examples (win, loss, tie). Choice: ties count half, as AlpacaEval does;
    unparseable and failed ones are counted apart and left out of the rate, never scored."""
    counts = {k: sum(r["verdict"] == k for r in records) for k in ("win", "loss", "tie", "unparseable", "failed")}
    judged = counts["win"] + counts["loss"] + counts["tie"]
    score = counts["win"] + 0.5 * counts["tie"]
    low, high = wilson_interval(score, judged)
    return {"win_rate": score / judged if judged else None, "ci95": [low, high], "judged": judged,
            "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "unparseable": counts["unparseable"], "failed": counts["failed"], "examples": len(records)}


# ----------------------------------------------------------------------------------------------------
# The three judges. Each maps (prompt, text A, text B) -> {"raw": ..., "letter": "A" | "B" | None | "tie"}.
# ----------------------------------------------------------------------------------------------------


def api_client(args: EvalArgs, max_tokens: int) -> ChatClient:
    """The chat-completions client (api_client.py: retries, whole-call deadline, no redirects, fatal 401/403/404)."""
    return ChatClient(args.api_base_url, args.api_model, args.api_key_env, timeout=args.api_timeout,
                      max_retries=args.max_retries, retry_backoff=args.retry_backoff,
                      retry_after_cap=args.retry_after_cap, max_tokens=max_tokens)


class APIJudge:
    """An OpenAI-compatible chat model as pairwise judge; JudgeFailed when an example cannot be judged."""

    def __init__(self, args: EvalArgs, template: str):
        self.client, self.template, self.name = api_client(args, max_tokens=256), template, f"api:{args.api_model}"

    def __call__(self, prompt: str, a: str, b: str) -> dict:
        text = self.client(self.template.format(prompt=prompt, a=a, b=b))
        return {"raw": text, "letter": parse_verdict(text)}


class HFJudge:
    """A local causal LM as judge: after the prompt and 'Preferred:', which continuation is likelier, ' A' or
    ' B'? Each is scored as a whole (sum of its tokens' log-probs), so any tokenizer works."""

    def __init__(self, args: EvalArgs, template: str, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(args.judge_model)
        self.model = AutoModelForCausalLM.from_pretrained(args.judge_model).to(device).eval()
        self.template, self.device, self.name = template, device, f"hf:{args.judge_model}"
        self.options = [self.tokenizer(x, add_special_tokens=False)["input_ids"] for x in (" A", " B")]

    @torch.no_grad()
    def __call__(self, prompt: str, a: str, b: str) -> dict:
        text = self.template.format(prompt=prompt, a=a, b=b) + " The two differ.\nPreferred:"
        context = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, mask = data.pad_right([context + option for option in self.options], data.pad_token_id(self.tokenizer))
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # (2, S, V); position s predicts token s+1
        scores = []
        for row, option in enumerate(self.options):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(option))
            scores.append(logprobs[row, positions, torch.tensor(option)].sum().item())
        lp_a, lp_b = scores
        letter = "tie" if lp_a == lp_b else ("A" if lp_a > lp_b else "B")
        return {"raw": f"log P(A)={lp_a:.4f} log P(B)={lp_b:.4f}", "letter": letter}


class RewardScorer:
    """Scores (prompt, response) with a reward model, optionally as R2M with feedback from a policy.

    With --r2m_checkpoint the R2M head (cross-attention + score head) comes from the checkpoint's state.pt and the
    policy from its policy/ folder; the policy reads the prompt and the response in its own tokens and its
    last-layer hidden states feed the cross-attention at ω(T) = Ω, the end of training."""

    def __init__(self, args: EvalArgs, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        if not args.judge_model:
            raise SystemExit("error: --judge_model (the reward model) is required for the rm judge and rm_accuracy")
        self.device, self.args = device, args
        self.rm_tokenizer = AutoTokenizer.from_pretrained(args.judge_model)
        rm = AutoModelForSequenceClassification.from_pretrained(args.judge_model, num_labels=1).to(device).eval()
        render = data.chat_render(self.rm_tokenizer) if args.task != "tldr" else None
        self.rm_view = data.make_rm_view(self.rm_tokenizer, render)
        self.policy = None
        if args.r2m_checkpoint:
            state = torch.load(os.path.join(args.r2m_checkpoint, "state.pt"), map_location="cpu", weights_only=False)
            if "policy_feedback" not in state["reward_model"]:
                raise SystemExit(f"error: {args.r2m_checkpoint} holds no R2M head (was it trained with --reward r2m?)")
            policy_dir = os.path.join(args.r2m_checkpoint, "policy")
            self.policy = AutoModelForCausalLM.from_pretrained(policy_dir).to(device).eval()
            self.policy_tokenizer = AutoTokenizer.from_pretrained(policy_dir)
            d_attn = state["config"]["d_attn"]
            self.omega = state["config"]["omega_floor"]  # ω(T) = max(½cos(π)+½, Ω) = Ω
            self.model = r2m.R2MRewardModel(rm, d_policy=self.policy.get_output_embeddings().in_features, d_attn=d_attn)
            self.model.load_trainable_state_dict(state["reward_model"])
        else:
            self.model = r2m.R2MRewardModel(rm, d_policy=1, d_attn=1)  # feedback path unused: the vanilla RM
        self.model.to(device).eval()
        self.name = ("r2m:" if self.policy is not None else "rm:") + args.judge_model

    @torch.no_grad()
    def _feedback(self, policy_prompts: list[list[int]], responses: list[str]):
        """The policy's last-layer states over its own tokens of prompt + response -> (h, h_mask)."""
        eos = self.policy_tokenizer.eos_token_id
        seqs = [p + self.policy_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos]
                for p, r in zip(policy_prompts, responses)]
        ids, mask = data.pad_left(seqs, data.pad_token_id(self.policy_tokenizer))
        return r2m.policy_hidden_states(self.policy, ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], policy_prompts: Optional[list[list[int]]] = None) -> torch.Tensor:
        """(B,) rewards. Without `policy_prompts` (the prompts in the policy's tokens): the vanilla RM's own
        reward; with them (needs an R2M checkpoint): R2M's reward with the policy's feedback at ω(T)."""
        ids, mask = data.pad_right([self.rm_view(p, r) for p, r in zip(prompts, responses)],
                                  data.pad_token_id(self.rm_tokenizer))
        rte = self.model.reward_token_embedding(ids.to(self.device), mask.to(self.device))
        if policy_prompts is None:
            return self.model.rewards_from_embedding(rte).cpu()
        h, h_mask = self._feedback(policy_prompts, responses)
        return self.model.rewards_from_embedding(rte, h, h_mask, self.omega).cpu()


class RMJudge:
    """The reward model as judge: the higher-scored text is preferred (equal scores: a tie)."""

    def __init__(self, scorer: RewardScorer, policy_prompt: Callable[[str], list[int]]):
        self.scorer, self.policy_prompt, self.name = scorer, policy_prompt, scorer.name

    def __call__(self, prompt: str, a: str, b: str) -> dict:
        pp = [self.policy_prompt(prompt)] * 2 if self.scorer.policy is not None else None
        r_a, r_b = self.scorer.score([prompt, prompt], [a, b], pp).tolist()
        return {"raw": f"r(A)={r_a:.6f} r(B)={r_b:.6f}", "letter": "tie" if r_a == r_b else ("A" if r_a > r_b else "B")}


# ----------------------------------------------------------------------------------------------------
# Data: evaluation prompts and references, responses, checks before any judge call
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; every non-empty line must be a JSON object."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no such file: {path}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"error: {path} line {n} is not valid JSON")
                if not isinstance(rows[-1], dict):
                    raise SystemExit(f"error: {path} line {n} is not a JSON object (expected {{\"id\": ..., ...}})")
    return rows


def drop_cut_last_line(path: str) -> None:
    """A crash while appending can leave one partial last line in a file we append to: cut it off (with a
    warning; its example is judged again) so that the file reads and the next append starts on a fresh line.
    A bad line anywhere else is still an error, from read_jsonl."""
    with open(path, "rb") as f:
        content = f.read()
    body = content.rstrip(b"\n")
    start = body.rfind(b"\n") + 1  # where the last non-empty line begins
    try:
        json.loads(body[start:] or b"{}")
        if content and not content.endswith(b"\n"):  # a whole record without its newline: complete the line
            with open(path, "ab") as f:
                f.write(b"\n")
        return
    except ValueError:
        pass
    with open(path, "r+b") as f:
        f.truncate(start)
    tqdm.write(f"warning: the last line of {path} was cut off (a crash while writing?); dropped, its example is "
               f"judged again", file=sys.stderr)


def read_references(path: str) -> dict[str, str]:
    """id -> reference, from .jsonl rows {id, reference} or an alpaca_eval JSON list {instruction, output}
    (then keyed by the instruction text)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no such file: {path} (--references)")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path} is not valid JSON ({e})")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SystemExit(f"error: {path} must be a JSON list of objects (instruction, output)")
        key, value = "instruction", "output"
    else:
        rows = read_jsonl(path)
        key, value = "id", "reference"
    if not rows:
        raise SystemExit(f"error: reference file {path} is empty")
    if any(key not in r or value not in r for r in rows):
        raise SystemExit(f"error: every row of {path} needs '{key}' and '{value}'")
    return {str(r[key]): data.response_text(r[value]) for r in rows}


def check_responses(rows: list[dict], source: str) -> None:
    if not rows:
        raise SystemExit(f"error: {source} holds no responses")
    for column in ("id", "prompt", "response"):
        if any(column not in r for r in rows):
            raise SystemExit(f"error: every row of {source} needs '{column}' (columns: id, prompt, response[, reference])")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"error: {source} repeats ids")


def attach_references(rows: list[dict], references: Optional[dict[str, str]], source: str) -> None:
    """Give every response its reference; ids (or prompts, for alpaca_eval files) must all match."""
    if references is not None:
        by_prompt = not any(str(r["id"]) in references for r in rows)
        missing = [str(r["id"]) for r in rows if (r["prompt"] if by_prompt else str(r["id"])) not in references]
        if missing:
            raise SystemExit(f"error: {len(missing)} responses have no matching reference (first ids: {missing[:5]})")
        for r in rows:
            r["reference"] = references[r["prompt"] if by_prompt else str(r["id"])]
    if any(not r.get("reference") for r in rows):
        raise SystemExit(f"error: {source} has responses without a reference; pass --references")


# ----------------------------------------------------------------------------------------------------
# 1. Generation
# ----------------------------------------------------------------------------------------------------


def policy_prompt_fn(task: str, tokenizer, max_prompt_tokens: int) -> Callable[[str], list[int]]:
    """How the policy reads a prompt: TL;DR as in train_tldr.py, dialogue through its chat template."""
    if task == "tldr":
        return lambda text: data.tokenize_prompt(tokenizer, text, max_prompt_tokens)
    return lambda text: data.chat_prompt_ids(tokenizer, text)


def default_generator_name(policy: str) -> str:
    """The run's folder name: runs/r2m/checkpoint/policy -> 'r2m'; a hub name -> its last part."""
    parts = [p for p in os.path.normpath(policy).split(os.sep) if p not in ("", ".")]
    while len(parts) > 1 and parts[-1] in ("policy", "checkpoint"):
        parts.pop()
    return parts[-1] if parts else "policy"


class Generator:
    """The policy writing responses: batched, left-padded, stopped at EOS, decoded without special tokens."""

    def __init__(self, args: EvalArgs, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.policy)
            self.policy = AutoModelForCausalLM.from_pretrained(args.policy).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"error: could not load policy {args.policy!r}: {type(e).__name__}: {e}")
        self.pad, self.eos = data.pad_token_id(self.tokenizer), self.tokenizer.eos_token_id
        sampling = (dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0
                    else dict(do_sample=False))
        self.config = GenerationConfig(max_new_tokens=args.max_new_tokens, pad_token_id=self.pad, eos_token_id=self.eos,
                                       **sampling)
        self.device, self.batch_size = device, args.batch_size
        torch.manual_seed(args.seed)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], desc: str = "generate") -> list[str]:
        """One response text per prompt (given in the policy's token ids)."""
        texts = []
        for s in tqdm(range(0, len(prompts), self.batch_size), desc=desc):
            ids, mask = data.pad_left(prompts[s : s + self.batch_size], self.pad)  # (B, S) each
            seqs = self.policy.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        generation_config=self.config)
            responses, resp_mask = r2m.truncate_after_eos(seqs[:, ids.shape[1] :].cpu(), self.eos, self.pad)
            texts += [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, resp_mask)]
        return texts

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation in the policy's chat template, ready for the assistant's next reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds any BOS


def generate(args: EvalArgs, rows: list[dict], device: torch.device, path: str) -> list[dict]:
    """Generate a response per row and write them all to `path` (id, prompt, response, generator, temperature)."""
    generator = Generator(args, device)
    to_ids = policy_prompt_fn(args.task, generator.tokenizer, args.max_prompt_tokens)
    texts = generator([to_ids(r["prompt"]) for r in rows])
    out = [{**r, "response": t, "generator": args.generator_name, "temperature": args.temperature}
           for r, t in zip(rows, texts)]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in out)
    return out


def write_alpaca_eval(rows: list[dict], path: str, generator: str) -> None:
    """model_outputs.json as AlpacaEval reads it: a JSON list of {instruction, output, generator[, dataset]}.
    Outputs are stripped of surrounding white space, as AlpacaEval's own generation does (it changes the
    lengths that the length-controlled win rate uses)."""
    outputs = [{"instruction": r["prompt"], "output": r["response"].strip(), "generator": generator,
                **({"dataset": r["dataset"]} if r.get("dataset") is not None else {})} for r in rows]
    with open(path, "w") as f:
        json.dump(outputs, f, indent=1)


# ----------------------------------------------------------------------------------------------------
# 2-3. Judge and report
# ----------------------------------------------------------------------------------------------------


def load_done(path: str, judge_name: str) -> dict[str, dict]:
    """Examples this judge already decided (or found unparseable) in an earlier run; failed ones are redone."""
    done = {}
    if os.path.exists(path):
        drop_cut_last_line(path)
        for r in read_jsonl(path):
            if r.get("judge") == judge_name and r["verdict"] != "failed":
                done[str(r["id"])] = r
    return done


def judge_each(items: list[dict], describe: Callable[[dict], dict], ask: Callable[[dict], dict], judge_name: str,
               path: str, max_consecutive_failures: int, unchanged: Callable[[dict, dict], bool]) -> list[dict]:
    """The fault-tolerant loop shared by every judge: skip items judged before (if what was judged is unchanged),
    ask for the rest, append each record to `path` as soon as it arrives. A record is `describe(item)` (what was
    judged) plus `ask(item)` (the judge's raw answer and verdict); JudgeFailed is recorded as verdict 'failed';
    after `max_consecutive_failures` failed in a row the run stops (all recorded so far is kept; a re-run resumes)."""
    by_id = {str(i["id"]): i for i in items}
    done = {k: r for k, r in load_done(path, judge_name).items() if k in by_id and unchanged(r, by_id[k])}
    todo = [i for i in items if str(i["id"]) not in done]
    if done:
        tqdm.write(f"{len(done)} examples already judged by {judge_name} in {path}: skipped")
    failed_in_a_row = 0
    with open(path, "a") as f:
        for item in tqdm(todo, desc=f"judge ({judge_name})"):
            record = {"id": str(item["id"]), "judge": judge_name, **describe(item)}
            try:
                record.update(ask(item))
                failed_in_a_row = 0
            except JudgeFailed as e:
                record.update(raw=None, verdict="failed", error=str(e))
                failed_in_a_row += 1
            f.write(json.dumps(record) + "\n")
            f.flush()
            done[record["id"]] = record
            if max_consecutive_failures and failed_in_a_row >= max_consecutive_failures:
                raise SystemExit(
                    f"error: {failed_in_a_row} examples in a row failed every retry (last: {record['error']}); the "
                    f"judge looks unreachable, so the run stops. The judgments so far are kept in {path}; re-run "
                    f"with the same --output_dir to resume")
    return [done[str(i["id"])] for i in items]


def judge_all(rows: list[dict], judge, args: EvalArgs, path: str) -> list[dict]:
    """Pairwise: each policy response against its reference, in a fixed random order per example."""

    def describe(r: dict) -> dict:
        return {"prompt": r["prompt"], "policy_response": r["response"], "reference": r["reference"],
                "policy_is_a": policy_is_a(args.seed, str(r["id"]))}

    def ask(r: dict) -> dict:
        a_is_policy = policy_is_a(args.seed, str(r["id"]))
        a, b = (r["response"], r["reference"]) if a_is_policy else (r["reference"], r["response"])
        result = judge(r["prompt"], a, b)  # JudgeFailed goes up to judge_each, which records it
        verdict = "tie" if result["letter"] == "tie" else policy_outcome(result["letter"], a_is_policy)
        return {"raw": result["raw"], "verdict": verdict}

    same = lambda record, r: record.get("policy_response") == r["response"]  # noqa: E731 - regenerated => judge again
    return judge_each(rows, describe, ask, judge.name, path, args.max_consecutive_failures, same)


def load_eval_rows(args: EvalArgs) -> list[dict]:
    """Prompts (+ references) of the evaluation set, with ids = row numbers."""
    d = TASK_DEFAULTS[args.task]
    dataset, split = args.dataset or d["dataset"], args.dataset_split or d["dataset_split"]
    if dataset is None:
        raise SystemExit("error: --task alpaca_eval needs --dataset path/to/alpaca_eval.json (AlpacaEval 2's 805 "
                         "instructions: the alpaca_eval.json of the tatsu-lab/alpaca_eval data set)")
    ref_col = args.reference_column or d["reference_column"]
    need_reference = not args.references and args.judge != "none"
    columns = [args.prompt_column] + ([ref_col] if need_reference else [])
    rows_in = data.load_rows(dataset, split, columns)[: args.limit]
    rows = []
    for i, row in enumerate(rows_in):
        rows.append({"id": str(i), "prompt": str(row[args.prompt_column])})
        if ref_col in row and row[ref_col] is not None and not args.references:
            rows[-1]["reference"] = data.response_text(row[ref_col])
        if args.task == "alpaca_eval" and row.get("dataset") is not None:
            rows[-1]["dataset"] = row["dataset"]
    return rows


def run_judge(args: EvalArgs) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    device = devices.resolve_device(args.device)
    template = TLDR_JUDGE_PROMPT if args.task == "tldr" else DIALOGUE_JUDGE_PROMPT
    references = read_references(args.references) if args.references else None
    # 1. responses: generated now, or read — and checked, before any judge is built or called
    if args.policy:
        rows = load_eval_rows(args)
        if args.judge != "none":
            attach_references(rows, references, "the evaluation set")
        rows = generate(args, rows, device, os.path.join(args.output_dir, "responses.jsonl"))
    elif args.responses:
        rows = read_jsonl(args.responses)[: args.limit]
        check_responses(rows, args.responses)
        args.generator_name = args.generator_name or rows[0].get("generator") or "policy"
        if args.judge != "none":
            attach_references(rows, references, args.responses)
    else:
        raise SystemExit("error: give --policy (to generate) or --responses (already generated)")
    if args.task in ("ultrafeedback", "alpaca_eval"):
        name = "model_outputs.json" if args.task == "alpaca_eval" else "alpaca_eval_outputs.json"
        write_alpaca_eval(rows, os.path.join(args.output_dir, name), args.generator_name)
        print(f"wrote {os.path.join(args.output_dir, name)} ({len(rows)} outputs, generator {args.generator_name!r})")
    if args.judge == "none":
        return {"task": args.task, "judge": None, "responses": len(rows), "failed": 0}
    # 2. the judge
    if args.judge == "api":
        judge = APIJudge(args, template)
    elif args.judge == "hf":
        if not args.judge_model:
            raise SystemExit("error: the hf judge needs --judge_model")
        judge = HFJudge(args, template, device)
    else:  # rm (main() checked the name)
        scorer = RewardScorer(args, device)
        pp = policy_prompt_fn(args.task, scorer.policy_tokenizer, args.max_prompt_tokens) if scorer.policy is not None else None
        judge = RMJudge(scorer, pp)
    records = judge_all(rows, judge, args, os.path.join(args.output_dir, "judgments.jsonl"))
    # 3. report
    summary = {"task": args.task, "judge": judge.name, "temperature": args.temperature if args.policy else None,
               "seed": args.seed, **summarise(records)}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    rate = "n/a" if summary["win_rate"] is None else f"{100 * summary['win_rate']:.1f}%"
    print(f"win rate {rate} (95% CI {100 * summary['ci95'][0]:.1f}-{100 * summary['ci95'][1]:.1f}) over "
          f"{summary['judged']} judged: {summary['wins']} wins, {summary['losses']} losses, {summary['ties']} ties; "
          f"{summary['unparseable']} unparseable, {summary['failed']} failed")
    return summary


# ----------------------------------------------------------------------------------------------------
# MT-Bench: two-turn answers through the chat template, each turn graded 1-10 by the api judge
# ----------------------------------------------------------------------------------------------------

# MT-Bench grades these categories against a reference answer (the questions file carries it as `reference`).
MT_BENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def mt_bench_grading_prompt(question: dict, answers: list[str], turn: int) -> str:
    """Our wording of MT-Bench's single-answer grading: turn 1 shows the question and the answer; turn 2 shows
    the whole conversation and grades the second answer only; math / reasoning / coding add the reference."""
    reference = question.get("reference") if question["category"] in MT_BENCH_REFERENCE_CATEGORIES else None
    parts = ["You are an impartial expert grading one answer of an AI assistant."]
    if turn == 2:
        parts.append("The conversation below has two user questions. Grade only the assistant's answer to the "
                     "second one; the first exchange is there as context.")
    if reference:
        parts.append("A reference answer is given. Compare the assistant's answer with it, point out its mistakes, "
                     "and let correctness weigh most.")
    else:
        parts.append("Weigh how helpful, relevant, accurate, deep and detailed the answer is, and its creativity "
                     "where the question invites it.")
    parts.append("Length alone is no merit. Explain your grade in a few sentences, then end with the grade from 1 "
                 "(worst) to 10 (best) in double square brackets, like this: Rating: [[5]]")
    text = " ".join(parts) + "\n\n"
    if turn == 1:
        text += f"[Question]\n{question['turns'][0]}\n\n"
        text += f"[Reference answer]\n{reference[0]}\n\n" if reference else ""
        return text + f"[The assistant's answer]\n{answers[0]}\n\n[End of the answer]"
    if reference:
        text += f"[Reference answers]\nTo the first question: {reference[0]}\nTo the second question: {reference[1]}\n\n"
    return text + (f"[Conversation]\nUser: {question['turns'][0]}\n\nAssistant: {answers[0]}\n\n"
                   f"User: {question['turns'][1]}\n\nAssistant (the answer to grade): {answers[1]}\n\n[End of the conversation]")


def parse_rating(text: str) -> Optional[float]:
    """The last [[x]] with 1 <= x <= 10, or None (unparseable: counted apart, never scored)."""
    found = RATING.findall(text or "")
    return float(found[-1]) if found and 1.0 <= float(found[-1]) <= 10.0 else None


def load_mt_bench_questions(path: str, limit: Optional[int]) -> list[dict]:
    """FastChat's question.jsonl: question_id, category, turns (two user messages), optional reference."""
    questions = read_jsonl(path)[:limit]
    if not questions:
        raise SystemExit(f"error: {path} holds no questions")
    for n, q in enumerate(questions, 1):
        if not {"question_id", "category", "turns"} <= set(q) or not isinstance(q["turns"], list) or len(q["turns"]) != 2:
            raise SystemExit(f"error: question {n} of {path} needs question_id, category and two turns (FastChat's format)")
        if q["category"] in MT_BENCH_REFERENCE_CATEGORIES and len(q.get("reference") or []) < 2:
            raise SystemExit(f"error: question {q['question_id']} ({q['category']}) of {path} needs a reference "
                             f"answer for each turn: MT-Bench grades {'/'.join(MT_BENCH_REFERENCE_CATEGORIES)} against one")
    if len({q["question_id"] for q in questions}) != len(questions):
        raise SystemExit(f"error: {path} repeats question ids")
    return questions


def mt_bench_answers(args: EvalArgs, questions: list[dict], device: torch.device) -> dict:
    """question_id -> [answer 1, answer 2]: generated now (turn 2 sees turn 1's answer) and written to
    mt_bench_answers.jsonl, or read from --responses (a file of that format)."""
    if args.responses:
        answers = {r.get("question_id"): r.get("answers") for r in read_jsonl(args.responses)}
        missing = [q["question_id"] for q in questions if len(answers.get(q["question_id"]) or []) != 2]
        if missing:
            raise SystemExit(f"error: {args.responses} lacks two answers for {len(missing)} questions (first: {missing[:5]})")
        return answers
    if not args.policy:
        raise SystemExit("error: give --policy (to generate) or --responses (mt_bench_answers.jsonl already made)")
    generator = Generator(args, device)
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    first = [a.strip() for a in generator([generator.chat_ids([user(q["turns"][0])]) for q in questions], "turn 1")]
    second = [a.strip() for a in generator(
        [generator.chat_ids([user(q["turns"][0]), {"role": "assistant", "content": a}, user(q["turns"][1])])
         for q, a in zip(questions, first)], "turn 2")]
    with open(os.path.join(args.output_dir, "mt_bench_answers.jsonl"), "w") as f:
        for q, a1, a2 in zip(questions, first, second):
            f.write(json.dumps({"question_id": q["question_id"], "category": q["category"], "turns": q["turns"],
                                "answers": [a1, a2], "generator": args.generator_name,
                                "temperature": args.temperature}) + "\n")
    print(f"wrote {f.name} ({len(questions)} questions, two answers each)")
    return {q["question_id"]: [a1, a2] for q, a1, a2 in zip(questions, first, second)}


def summarise_mt_bench(records: list[dict]) -> dict:
    """Mean grade over all graded turns, per turn and per category (both turns); unparseable and failed
    grades counted apart and left out of every mean."""
    rated = [r for r in records if r["verdict"] == "rated"]
    mean = lambda rs: sum(r["score"] for r in rs) / len(rs) if rs else None  # noqa: E731
    return {"score": mean(rated), "turn_1": mean([r for r in rated if r["turn"] == 1]),
            "turn_2": mean([r for r in rated if r["turn"] == 2]),
            "categories": {c: mean([r for r in rated if r["category"] == c]) for c in sorted({r["category"] for r in records})},
            "rated": len(rated), "unparseable": sum(r["verdict"] == "unparseable" for r in records),
            "failed": sum(r["verdict"] == "failed" for r in records), "turns": len(records)}


def run_mt_bench(args: EvalArgs) -> dict:
    if not args.dataset:
        raise SystemExit("error: --task mt_bench needs --dataset path/to/question.jsonl (FastChat's MT-Bench questions)")
    if args.judge not in ("api", "none"):
        raise SystemExit(f"error: --task mt_bench is graded by --judge api (or generate only: --judge none), got {args.judge!r}")
    questions = load_mt_bench_questions(args.dataset, args.limit)
    os.makedirs(args.output_dir, exist_ok=True)
    answers = mt_bench_answers(args, questions, devices.resolve_device(args.device))
    if args.judge == "none":
        return {"task": "mt_bench", "judge": None, "questions": len(questions), "failed": 0}
    # Choice: 1024 tokens for the grader's explanation and rating (the pairwise judge's 256 cut some off).
    client, name = api_client(args, max_tokens=1024), f"api:{args.api_model}"
    items = [{"id": f"{q['question_id']}/turn{t}", "question": q, "turn": t, "answers": answers[q["question_id"]][:t]}
             for q in questions for t in (1, 2)]

    def describe(item: dict) -> dict:
        return {"question_id": item["question"]["question_id"], "category": item["question"]["category"],
                "turn": item["turn"], "answers": item["answers"]}

    def ask(item: dict) -> dict:
        text = client(mt_bench_grading_prompt(item["question"], item["answers"], item["turn"]))
        score = parse_rating(text)
        return {"raw": text, "score": score, "verdict": "unparseable" if score is None else "rated"}

    same = lambda record, item: record.get("answers") == item["answers"]  # noqa: E731 - new answers => grade again
    records = judge_each(items, describe, ask, name, os.path.join(args.output_dir, "judgments.jsonl"),
                         args.max_consecutive_failures, same)
    summary = {"task": "mt_bench", "judge": name, "temperature": args.temperature if args.policy else None,
               **summarise_mt_bench(records)}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"MT-Bench score {fmt(summary['score'])} (turn 1 {fmt(summary['turn_1'])}, turn 2 {fmt(summary['turn_2'])}) "
          f"over {summary['rated']} graded turns; {summary['unparseable']} unparseable, {summary['failed']} failed; "
          + ", ".join(f"{c} {fmt(v)}" for c, v in summary["categories"].items()))
    return summary


# ----------------------------------------------------------------------------------------------------
# RM accuracy on held-out preference pairs (the paper's RM accuracy analysis)
# ----------------------------------------------------------------------------------------------------


def run_rm_accuracy(args: EvalArgs) -> dict:
    if not args.preference_file:
        raise SystemExit("error: --mode rm_accuracy needs --preference_file (prompt, chosen, rejected)")
    rows = data.load_rows(args.preference_file, args.dataset_split or "train", ["prompt", "chosen", "rejected"])[: args.limit]
    device = devices.resolve_device(args.device)
    scorer = RewardScorer(args, device)
    pp = policy_prompt_fn(args.task, scorer.policy_tokenizer, args.max_prompt_tokens) if scorer.policy is not None else None
    correct = {"vanilla": 0, "r2m": 0}
    for s in tqdm(range(0, len(rows), args.batch_size), desc="rm accuracy"):
        batch = rows[s : s + args.batch_size]
        prompts = [str(r["prompt"]) for r in batch]
        chosen = [data.response_text(r["chosen"]) for r in batch]
        rejected = [data.response_text(r["rejected"]) for r in batch]
        correct["vanilla"] += int((scorer.score(prompts, chosen) > scorer.score(prompts, rejected)).sum())
        if pp is not None:
            pol = [pp(p) for p in prompts]
            correct["r2m"] += int((scorer.score(prompts, chosen, pol) > scorer.score(prompts, rejected, pol)).sum())
    summary = {"pairs": len(rows), "vanilla_accuracy": correct["vanilla"] / len(rows),
               "r2m_accuracy": correct["r2m"] / len(rows) if pp is not None else None,
               "omega": scorer.omega if pp is not None else None, "reward_model": args.judge_model}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "rm_accuracy.json"), "w") as f:
        json.dump(summary, f, indent=1)
    r2m_part = f", R2M with policy feedback {summary['r2m_accuracy']:.3f}" if pp is not None else ""
    print(f"RM accuracy on {len(rows)} pairs: vanilla {summary['vanilla_accuracy']:.3f}{r2m_part}")
    return summary


def main(argv=None) -> dict:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArgs).parse_args_into_dataclasses(args=argv)
    if args.task not in TASK_DEFAULTS:
        raise SystemExit(f"error: --task must be one of {sorted(TASK_DEFAULTS)}, got {args.task!r}")
    for name in ("judge", "temperature", "max_new_tokens", "prompt_column"):  # per-task defaults
        if getattr(args, name) is None:
            setattr(args, name, TASK_DEFAULTS[args.task][name])
    if args.generator_name is None and args.policy:
        args.generator_name = default_generator_name(args.policy)
    if args.mode == "rm_accuracy":
        return run_rm_accuracy(args)
    if args.mode != "judge":
        raise SystemExit(f"error: --mode must be 'judge' or 'rm_accuracy', got {args.mode!r}")
    if args.judge not in ("api", "hf", "rm", "none"):
        raise SystemExit(f"error: --judge must be 'api', 'hf', 'rm' or 'none', got {args.judge!r}")
    if args.judge == "api":
        api_key(args.api_key_env)  # a missing key fails now, not after a long generation
    return run_mt_bench(args) if args.task == "mt_bench" else run_judge(args)


EXIT_FAILED_EXAMPLES = 3  # the run finished, but some examples failed every retry (0: all judged; 1: error; 2: flags)


def cli(argv=None) -> int:
    """main() as a command, with the exit status of the module docstring."""
    summary = main(argv)
    if summary.get("failed"):
        print(f"error: {summary['failed']} examples failed every retry and are left out of the result; re-run with "
              f"the same --output_dir to retry only them", file=sys.stderr)
        return EXIT_FAILED_EXAMPLES
    return 0


if __name__ == "__main__":
    sys.exit(cli())
