"""Every shipped tool runs as a user runs it, at a tiny size, so none of them can rot unnoticed: the benchmarks
(step cost, the TRL comparison, the memory plan), the plot script, and the tiny models' writer. (The training
scripts, eval_judge.py, the GPU check and the study's --quick have their own tests.)"""

import json
import os
import subprocess
import sys

import pytest

from helpers import ENV, script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(*cmd, timeout=600):
    proc = subprocess.run(list(cmd), env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout.strip().splitlines()


def test_tiny_save_models_writes_folders_that_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    lines = run(sys.executable, "-m", "launch.tiny", "--save-models", str(tmp_path / "models"))
    assert [line.split()[2] for line in lines] == ["policy", "reward_model", "judge"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "policy")
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "judge")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "models" / "reward_model")
    assert rm.config.num_labels == 1 and AutoTokenizer.from_pretrained(tmp_path / "models" / "policy").eos_token


def test_plot_run_draws_a_real_runs_metrics(tmp_path):
    pytest.importorskip("matplotlib", reason="pip install matplotlib (.ci/run installs it)")
    out = str(tmp_path / "run")
    run(*script("train_tldr.py"), "--preset", "tiny", "--total_trajectories", "64", "--save_every", "0",
        "--output_dir", out)
    lines = run(*script("plot_run.py"), out, "-o", str(tmp_path / "run.png"))
    assert lines[-1].startswith(f"wrote {tmp_path / 'run.png'}") and "GREBT loss" in lines[-1]
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_step_bench_tiny_prints_its_table_and_ratio(tmp_path):
    lines = run(*script("benchmarks/step_bench.py"), "--preset", "tiny", "--threads", "1", "--repeats", "1",
                "--measured_steps", "1", "--queries_per_step", "4", "--policy_minibatch_size", "16",
                "--micro_batch_size", "8", "--output_dir", str(tmp_path / "bench"))
    header = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    assert lines[header].split()[1:] == ["vanilla", "r2m", "whole", "RM"]
    assert [line.split()[0] for line in lines[header + 1: header + 6]] == ["rollout", "reward", "policy",
                                                                           "reward_model", "step"]
    assert lines[-1].startswith("r2m/vanilla step time ratio: ")


def test_vs_trl_runs_both_loops_twice(tmp_path):
    pytest.importorskip("trl", reason="pip install trl (.ci/run installs it); the comparison needs TRL")
    # two repeats: each repeat of our loop must get a fresh run folder
    lines = run(*script("benchmarks/vs_trl.py"), "--threads", "1", "--steps", "1", "--repeats", "2",
                "--queries_per_step", "4", "--group_size", "2", "--max_new_tokens", "4", "--minibatch", "8",
                "--epochs", "1")
    assert sum(line.startswith("[2/2]") for line in lines) == 2
    assert lines[-1].startswith("ours/trl step time ratio: ")
    assert float(lines[-1].split()[-1]) > 0


def test_memory_plan_command_line_on_small_configs(tmp_path):
    policy = dict(model_type="gpt_neox", vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    rm = dict(policy, hidden_size=48, intermediate_size=96)
    for name, config in (("policy.json", policy), ("rm.json", rm)):
        (tmp_path / name).write_text(json.dumps(config))
    lines = run(*script("benchmarks/memory_plan.py"), "--preset", "tiny", "--policy_config", str(tmp_path / "policy.json"),
                "--reward_config", str(tmp_path / "rm.json"), "--output_dir", str(tmp_path / "plan"),
                "--gpu_memory_gib", "1")
    assert lines[-1].startswith("predicted peak ") and "fits with" in lines[-1]
    assert any(line.startswith("generation") for line in lines)
    # the step's work: its padding and the predicted run, before the verdict
    padding = next(line for line in lines if line.startswith("padding: "))
    assert padding.endswith("% of the step's tokens") and 0 <= float(padding.split()[1].rstrip("%")) < 100
    run_line = next(line for line in lines if line.startswith("predicted run: "))
    assert " GPU-days on one H100 (" in run_line and float(run_line.split()[2]) >= 0 and " steps of " in run_line
    assert not os.path.exists(tmp_path / "plan")  # the plan simulates a run; it writes none
