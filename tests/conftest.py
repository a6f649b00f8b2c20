import os

import pytest

# Kernels tests run Triton on CPU through its interpreter when no GPU is present.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized-data cache for the whole session (the bundled corpus is tokenized once)."""
    return str(tmp_path_factory.mktemp("data_cache"))
