"""Shared fixtures: tiny models and a tokenizer built in code. Nothing is downloaded.

The suite runs from a scratch folder (helpers.SCRATCH) whose runs/ holds a finished run at every default
--output_dir, and fails if it added or changed anything in the checkout (see helpers.py)."""

import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ROOT, SCRATCH, THREADS  # noqa: E402

sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(THREADS)

from launch import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "learning: a tiny run that must learn; R2M_TEST_SEED and R2M_TEST_THREADS "
                            "re-run it on other seeds and thread counts (helpers.py)")


def _default_output_dirs() -> set[str]:
    """Every --output_dir a script uses when none is given: the loop's default and each preset's."""
    import dataclasses

    import r2m
    from launch import flags

    dirs = {f.default for f in dataclasses.fields(r2m.R2MConfig) if f.name == "output_dir"}
    for presets in (flags.TLDR_PRESETS, flags.ULTRAFEEDBACK_PRESETS):
        dirs |= {preset["output_dir"] for preset in presets.values() if "output_dir" in preset}
    return dirs


def _checkout_files() -> dict[str, float]:
    """path -> mtime of every file in the checkout but git's own folder and Python's caches."""
    files = {}
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in (".git", "__pycache__", ".pytest_cache")]
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, ROOT)] = os.path.getmtime(path)
    return files


@pytest.fixture(scope="session", autouse=True)
def scratch_working_directory():
    """Run every test from SCRATCH, where runs/ already holds a run at each default output folder (so a test
    that writes to a default folder fails here as it would after a user's quick start), and check at the end
    that the suite left the checkout as it found it."""
    for output_dir in _default_output_dirs():
        run = os.path.join(SCRATCH, output_dir)
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 0, "reward/mean": 0.0}) + "\n")
    before = _checkout_files()
    cwd = os.getcwd()
    os.chdir(SCRATCH)
    yield
    os.chdir(cwd)
    after = _checkout_files()
    touched = sorted(p for p in after if before.get(p) != after[p])
    assert not touched, f"the tests wrote into the checkout: {touched[:10]}"


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture
def models(tokenizer):
    """(policy, ref_policy, rm): GPT-NeoX policy (D_p = 64) and a GPT-NeoX RM of another width (D_rm = 48)."""
    policy = tiny.build_policy(tokenizer, seed=0)
    return policy, copy.deepcopy(policy), tiny.build_reward_model(tokenizer, seed=1)


@pytest.fixture
def prompts(tokenizer):
    rows = tiny.synthetic_tldr_rows(16, seed=3)
    return [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-48:] for r in rows]
