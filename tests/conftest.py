"""Shared test set-up: offline, CPU DeepSpeed, and the data root and tokenizer fixtures."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ["DS_ACCELERATOR"] = "cpu"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root():
    """The shared data root (explicit/$SLM_DATA/../shared/data); skips when absent."""
    from slm_llm.data import DataError, resolve_data_root

    try:
        return resolve_data_root()
    except DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (converted once into the cache, then fast to load)."""
    from slm_llm.config import ModelConfig
    from slm_llm.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny-llama"))
