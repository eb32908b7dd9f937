import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import tiny  # noqa: E402

import vtprune  # noqa: E402


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str = "sdpa"):
    return tiny.build(family, attn=attn)


@pytest.fixture
def model_factory():
    """Cached tiny model per (family, attention implementation); always returned unpatched."""

    def get(family, attn="sdpa"):
        model = _model(family, attn)
        if vtprune.is_patched(model):
            vtprune.unpatch(model)
        return model

    return get


def supports(method: str, family: str) -> bool:
    """Whether ``method`` has its signals on ``family`` (CLS attention needs a CLS token)."""
    if method in SINGLE_CROP_METHODS and family == "llava_next":
        return False
    return not (method in CLS_METHODS and family.startswith("qwen"))


#: methods that need the vision tower's CLS attention (LLaVA families only)
CLS_METHODS = ("cls", "todre", "visionzip", "vispruner")
#: methods that do not handle AnyRes / multi-crop images yet
SINGLE_CROP_METHODS = ("visionzip",)
