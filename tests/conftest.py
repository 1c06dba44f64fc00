"""Shared fixtures: the embedded tokenizer (real chat format) and tiny random models."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import model as M  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    t = M.load_tokenizer("tiny")
    if t.pad_token_id is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="session")
def tiny(tok):
    return M.tiny_model(tok, seed=0).eval()
