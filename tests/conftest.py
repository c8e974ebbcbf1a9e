import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite checks exactness on the CPU (float32 / float64): on a GPU machine train.py would pick
# cuda and bf16 by default, and the exact comparisons would fail. BIPOST_TEST_CUDA=1 lets it see GPUs.
if not os.environ.get("BIPOST_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' caches (the Arrow conversion, the tokenized rows) under tmp_path, out of the user's."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
