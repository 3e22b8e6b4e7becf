"""eval_judge.py's benchmark tasks, offline: AlpacaEval 2 outputs (checked with the real alpaca_eval loader) and
MT-Bench's two-turn answers graded by the local scripted OpenAI-compatible server."""

import json
import os

import pytest

import eval_judge
from launch import tiny
from test_eval_judge import KEY, ScriptedServer


@pytest.fixture(scope="module")
def dialogue_policy(tmp_path_factory):
    """A tiny chat policy as the dialogue tiny preset builds it (Llama-style, chat template), saved where a
    training run saves its policy: <run>/checkpoint/policy."""
    path = tmp_path_factory.mktemp("runs") / "tiny_dialogue" / "checkpoint" / "policy"
    tok = tiny.build_tokenizer()
    tiny.build_policy(tok, seed=0, arch="llama").save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def test_alpaca_eval_outputs_load_with_alpaca_eval(tmp_path, dialogue_policy):
    out = tmp_path / "out"
    summary = eval_judge.main(["--task", "alpaca_eval", "--policy", dialogue_policy, "--dataset", tiny.ALPACA_EVAL_TINY,
                               "--max_new_tokens", "8", "--output_dir", str(out), "--device", "cpu"])
    assert summary["judge"] is None and summary["responses"] == 6  # --judge none is the default here
    with open(tiny.ALPACA_EVAL_TINY) as f:
        instructions = json.load(f)
    responses = eval_judge.read_jsonl(str(out / "responses.jsonl"))
    assert all(r["temperature"] == 0.7 for r in responses)  # the task's default sampling temperature
    try:
        from alpaca_eval.utils import load_or_convert_to_dataframe
    except Exception as e:  # noqa: BLE001 - any import failure of the optional package means: cannot check here
        print(f"SKIP reason: alpaca_eval cannot be imported ({type(e).__name__}: {e})")
        pytest.skip(f"alpaca_eval cannot be imported ({type(e).__name__}); pip install 'setuptools<81' alpaca-eval==0.6.6")
    frame = load_or_convert_to_dataframe(str(out / "model_outputs.json"))
    assert len(frame) == len(instructions)
    assert list(frame["instruction"]) == [r["instruction"] for r in instructions]  # one output per instruction
    assert list(frame["dataset"]) == [r["dataset"] for r in instructions]  # carried over
    assert set(frame["generator"]) == {"tiny_dialogue"}  # the run's folder name
    assert list(frame["output"]) == [r["response"].strip() for r in responses]
    assert all(o == o.strip() for o in frame["output"])


def test_judge_none_generates_only_for_tldr(tmp_path):
    paths = tiny.save_models(str(tmp_path / "models"))
    summary = eval_judge.main(["--policy", paths["policy"], "--dataset", tiny.TLDR_TINY_TEST, "--limit", "3",
                               "--judge", "none", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"),
                               "--device", "cpu"])
    assert summary == {"task": "tldr", "judge": None, "responses": 3, "failed": 0}
    assert len(eval_judge.read_jsonl(str(tmp_path / "out" / "responses.jsonl"))) == 3
    assert not os.path.exists(tmp_path / "out" / "judgments.jsonl")


def grader(body):
    """The scripted judge: 9 for a first turn graded against a reference, 4 for any second turn, no rating for
    the roleplay question's first turn, 7 otherwise."""
    content = body["messages"][0]["content"]
    if "second one" in content:
        return "Fine follow-up.\nRating: [[4]]"
    if "[Reference answer]" in content:
        return "Correct.\nRating: [[9]]"
    if "Pretend to be my dog" in content:
        return "I would give it a good mark."
    return "Decent.\n[[7]]"


def test_mt_bench_grades_each_turn_and_resumes(tmp_path, dialogue_policy, monkeypatch):
    pytest.importorskip("openai", reason="the api judge needs `pip install openai`, which is not installed here")
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    server = ScriptedServer(default=grader)
    args = ["--task", "mt_bench", "--policy", dialogue_policy, "--dataset", tiny.MT_BENCH_TINY, "--max_new_tokens", "6",
            "--api_base_url", server.url, "--api_key_env", "TEST_JUDGE_KEY", "--api_model", "grader-x",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--retry_backoff", "0.01", "--max_retries", "2"]
    try:
        requests = server.requests  # every grading prompt, kept for the checks below
        server.script = ["500"] * 3  # the first grade fails every retry (max_retries 2): counted apart, retried later
        first = eval_judge.main(args)
        assert (first["rated"], first["unparseable"], first["failed"]) == (4, 1, 1) and len(server.requests) == 6 + 2
        assert first["categories"]["writing"] == pytest.approx(4.0)  # only its graded turn counts
        server.requests = []
        summary = eval_judge.main(args)  # resume: only the failed grade is asked again
        assert len(server.requests) == 1
        # turn 1: writing 7, math 9 (graded against its reference), roleplay unparseable; turn 2: 4, 4, 4
        assert (summary["rated"], summary["unparseable"], summary["failed"], summary["turns"]) == (5, 1, 0, 6)
        assert summary["turn_1"] == pytest.approx(8.0) and summary["turn_2"] == pytest.approx(4.0)
        assert summary["score"] == pytest.approx((7 + 9 + 4 + 4 + 4) / 5)
        assert summary["categories"] == pytest.approx({"math": 6.5, "roleplay": 4.0, "writing": 5.5})
        prompts = {(r["body"]["messages"][0]["content"].count("second one"), q): r["body"]["messages"][0]["content"]
                   for r in requests for q in ("3 + 4", "landlord") if q in r["body"]["messages"][0]["content"]}
        assert "[Reference answer]\n7" in prompts[(0, "3 + 4")]  # math: reference-guided
        assert "To the second question: 12" in prompts[(1, "3 + 4")]
        assert "Reference" not in prompts[(0, "landlord")]  # writing: no reference
        answers = eval_judge.read_jsonl(str(tmp_path / "out" / "mt_bench_answers.jsonl"))
        assert [a["question_id"] for a in answers] == [81, 111, 91] and all(len(a["answers"]) == 2 for a in answers)
        assert prompts[(1, "landlord")].count(answers[0]["answers"][0]) >= 1  # turn 2 is graded in context
        # resume: the same answers (same seed) are graded already, the unparseable one included
        server.requests = []
        again = eval_judge.main(args)
        assert server.requests == [] and again == summary
    finally:
        server.close()
