import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The machine-level cache (the MFU peak, train/peak.py) goes to a folder of this session, never
# the user's ~/.cache; subprocesses inherit it. Removed when the session ends.
_CACHE = tempfile.mkdtemp(prefix="archlab-test-cache-")
os.environ["ARCHLAB_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

# The shared real data sets live beside the checkout (../shared/datasets); a clean clone elsewhere
# (CI) finds them through ARCHLAB_SHARED_DATASETS or the workplace's /work/shared/datasets.
_CANDIDATES = [
    os.environ.get("ARCHLAB_SHARED_DATASETS", ""),
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets"),
    "/work/shared/datasets",
]
SHARED_DATASETS = next((c for c in _CANDIDATES if c and os.path.isdir(c)), _CANDIDATES[1])


@pytest.fixture
def shakespeare_path() -> str:
    path = os.path.abspath(os.path.join(SHARED_DATASETS, "tinyshakespeare", "input.txt"))
    if not os.path.exists(path):
        pytest.skip("../shared/datasets/tinyshakespeare not present")
    return path


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process runs set torch's thread count; give the rest of the suite its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def stories_chars_300(tmp_path_factory):
    """300 built-in stories at character level, prepared once per session: read it, never write
    into it (a test that changes its data folder prepares its own)."""
    from archlab.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("stories_chars_300")
    return prepare_dataset(
        "stories", root / "chars", tokenizer="char", num_stories=300, verbose=False
    )
