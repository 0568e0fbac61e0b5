import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: fail at once instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def tiny_cfg(tmp_path):
    """The embedded default config writing into a fresh temporary run directory."""
    from medqa_loop.config import load_config

    def make(*overrides: str):
        return load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def tokenizer():
    from medqa_loop.config import ModelConfig
    from medqa_loop.model import load_tokenizer

    return load_tokenizer(ModelConfig(tokenizer="mistral-common"))
