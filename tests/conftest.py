import copy
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):   # one torch thread per test process: the workers share the cores
    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from models import STORIES, need_data  # noqa: E402


@pytest.fixture(scope="session")
def _stories_captured():
    need_data("stories260K", "stories260K.bin")
    from lowbit.ir.load import load
    return load(str(STORIES))


@pytest.fixture
def stories_ir(_stories_captured):
    """A fresh copy of the captured stories260K IR (capture once per session: export is slow)."""
    return copy.deepcopy(_stories_captured)


@pytest.fixture(scope="session")
def stories_model():
    need_data("stories260K", "stories260K.bin")
    from lowbit.ir.load import load_model
    return load_model(str(STORIES))[0]


@pytest.fixture(scope="session")
def _smol_captured():
    from lowbit.tools.api import load
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def smol_model():
    from lowbit.tools.defaults import load_model
    return load_model("smollm2-135m")[0]
