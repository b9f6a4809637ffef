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


@pytest.fixture(scope="session")
def generated_clips(tmp_path_factory):
    """``generated_clips(size)``: tools.make_default_data's scenes (12 videos of 17 frames, 8 images) at ``size``
    pixels, written once per size per session for every test file that trains a VAE on them."""
    from tools.make_default_data import make_default_data

    made: dict[int, Path] = {}

    def at(size: int) -> Path:
        if size not in made:
            made[size] = tmp_path_factory.mktemp(f"default_data_{size}")
            make_default_data(made[size], num_videos=12, num_images=8, size=size, frames=17, show_progress=False)
        return made[size]

    return at


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


@pytest.fixture
def one_process_group():
    """A one-process gloo group in this process (what ``build_engine`` joins), torn down after the test so that tests
    starting their own groups find none."""
    from infra.distributed import free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        yield
    finally:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        ds_comm.cdb = None
        ds_groups._WORLD_GROUP = None  # an engine's clone of the world group dies with it; the next engine makes its own
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
