import os

# Tests never touch a network: set before diffusers / transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(base_path, teacher_path): tiny SD1.5- and SD-Turbo-shaped pipelines at 64 px, built once per worker."""
    from yoso.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), resolution=64)


@pytest.fixture(scope="session")
def tiny_base(tiny_models):
    return tiny_models[0]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_models):
    return tiny_models[1]
