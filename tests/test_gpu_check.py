"""benchmarks/gpu_check.py is what a rented GPU runs, once: its rehearsal on a CPU must pass, a child that fails must
be reported at once, no subprocess may outlive the budget, and a check stopped part-way keeps what it measured."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, ROOT, script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

ENV1 = {**ENV, "OMP_NUM_THREADS": "1"}


def files_under(folder) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names]


def read_results(folder) -> list[dict]:
    with open(os.path.join(folder, gpu_check.RESULTS)) as f:
        return [json.loads(line) for line in f]


def test_the_rehearsal_runs_every_part_of_the_full_path_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([*script("benchmarks/gpu_check.py"), "--rehearse", "--output_dir", str(out)], env=ENV1,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parts = read_results(out)
    assert [p["part"] for p in parts] == ["configs", "smoke train_tldr.py", "smoke train_ultrafeedback.py", "step vanilla",
                                          "step r2m", "memory plan vanilla", "memory plan r2m", "matmul"]
    assert all(p["ok"] for p in parts), parts
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks", "configs")) if f.endswith(".json"))
    assert sorted(parts[0]["configs"]) == shipped and all("tiny cut runs" in v for v in parts[0]["configs"].values())
    report = json.loads((out / "gpu_check.json").read_text())
    for variant in ("vanilla", "r2m"):
        phases = report["measured"][variant]["phases"]
        expected = {"generation", "old/ref log-probs", "RM annotation", "policy update"} | (
            {"RM update (GREBT)"} if variant == "r2m" else set())
        assert set(phases) == expected and all(p["seconds"] >= 0 for p in phases.values())
        assert all(report["plan"][variant]["peaks"][p] > 0 for p in expected)  # the memory plan beside it
        summary = report["summary"][variant]
        assert summary["tokens_per_second"] > 0 and 0 < summary["mfu_vs_measured_matmul"]
        assert summary["full_run_hours"] == pytest.approx(summary["full_step_seconds"] * 122 / 3600)
    assert report["summary"]["r2m_over_vanilla"]["step_time"] > 0
    markdown = (out / "gpu_check.md").read_text().strip().splitlines()
    lines = proc.stdout.strip().splitlines()
    assert lines[-len(markdown):] == markdown and any(line.startswith("| policy update |") for line in markdown)
    # how far the plan's two constants were off, from the plan's count of the same step's work
    against = next(line for line in markdown if line.startswith("- against the plan's constants (R2M): "))
    assert "TFLOP/s (assumed: 400)" in against and "ms a step of a generation batch (assumed: 30)" in against
    assert report["plan"]["r2m"]["cost"]["decode_steps"] > 0
    # what comes back from a rented machine: at most 8 files, none more than 2 folders down
    files = files_under(out)
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files), files


def test_a_child_that_raises_is_reported_at_once_with_its_exception(tmp_path):
    """A config that transformers accepts but whose model cannot be built (an unknown activation)."""
    bad = tmp_path / "bad.json"
    spec = json.loads(open(os.path.join(ROOT, "benchmarks", "configs", gpu_check.STEP_CONFIG)).read())
    bad.write_text(json.dumps({**spec, "hidden_act": "no_such_activation"}))
    t = time.monotonic()
    out = gpu_check.run_child(gpu_check.measure, ("vanilla", gpu_check.SIZES["tiny"], "cpu", str(bad), True,
                                                  str(tmp_path / "run")), timeout=300)
    assert time.monotonic() - t < 30
    assert "no_such_activation" in out["error"], out


def test_a_child_that_dies_without_a_word_is_reported_with_its_exit_code():
    t = time.monotonic()
    out = gpu_check.run_child(os._exit, (3,), timeout=300)
    assert time.monotonic() - t < 30
    assert out == {"error": "the process ended without a result (exit code 3)"}
    assert gpu_check.exit_description(-9) == "killed by SIGKILL"


def test_no_part_outlives_a_small_budget(tmp_path):
    """With 20 s for everything, the first smoke run is stopped when they are spent, later parts are not started,
    a memory plan still running is stopped, and the check ends soon after with a non-zero exit and every part accounted for."""
    out = tmp_path / "check"
    t = time.monotonic()
    proc = subprocess.run([*script("benchmarks/gpu_check.py"), "--rehearse", "--budget_seconds", "20", "--output_dir",
                           str(out)], env=ENV1, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t
    assert proc.returncode != 0 and "part(s) of the check failed" in proc.stderr, proc.stderr[-2000:]
    parts = {p["part"]: p for p in read_results(out)}
    assert len(parts) == 8 and parts["configs"]["ok"]
    assert all(p["at_seconds"] <= 20 + 10 for name, p in parts.items() if name != "matmul"), parts
    assert "budget" in parts["step r2m"]["error"]
    assert all(p["ok"] or "budget" in p["error"] for name, p in parts.items() if name.startswith("memory plan"))
    assert wall < 20 + 60, wall  # start-up, the matmul and the report: seconds, not another budget
    assert (out / "gpu_check.md").exists()


def test_a_check_stopped_part_way_keeps_the_parts_it_finished(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.Popen([*script("benchmarks/gpu_check.py"), "--rehearse", "--output_dir", str(out)], env=ENV1,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / gpu_check.RESULTS
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 2):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the check and its children, as a time limit stops them
        proc.wait()
    parts = read_results(out)
    assert [p["part"] for p in parts][:2] == ["configs", "smoke train_tldr.py"] and parts[1]["ok"], parts
    assert len(parts) < 8 and not (out / "gpu_check.json").exists()
