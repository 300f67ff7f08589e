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
