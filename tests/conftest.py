"""Shared fixtures: real models, loaded once per session. Nothing comes from a hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once."""
    from engine.model_loader import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def default_tokenizer(default_model):
    return default_model.tokenizer
