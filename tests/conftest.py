import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SSVAE_SHARED_DIR", ROOT.parent / "shared"))

# Tests share 2 cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder (reference files and real footage); tests that need it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present")
    return SHARED
