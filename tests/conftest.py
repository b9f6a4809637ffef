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


# ---------------------------------------------------------------------- tiny text-to-video runs shared by test files
LORA_ARGS = ("lora.enabled=true", "lora.rank=8", "lora.alpha=8", "run.max_steps=12", "run.eval_every=0",
             "run.eval_at_start=false", "run.save_every=6", "optimizer.lr=1e-2", "optimizer.warmup_steps=0")


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory):
    """A base DiT (a 4-step dit.train run with its dit/ export; tiny random SSVAE, MiniLM) and the run YAML."""
    from test_t2v_train import make_t2v_assets, run_t2v

    root = tmp_path_factory.mktemp("lora")
    config = make_t2v_assets(root)
    run_t2v(config, root / "base", "run.max_steps=4", "run.eval_every=0", "run.eval_at_start=false")
    return config, root


@pytest.fixture(scope="session")
def lora_whole(lora_runs):
    """A 12-step LoRA run on the base (its lora/ adapter and its merged dit/)."""
    from test_t2v_train import run_t2v

    config, root = lora_runs
    run_t2v(config, root / "whole", f"lora.base={root / 'base/dit'}", *LORA_ARGS)
    return root / "whole"
