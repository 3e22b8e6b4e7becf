"""Shared fixtures: tiny models and a tokenizer built in code. Nothing is downloaded."""

import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)

import tiny  # noqa: E402


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
