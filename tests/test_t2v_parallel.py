"""Text-to-video training under DeepSpeed-Ulysses sequence parallelism and tensor parallelism (2 processes, gloo,
CPU): the ranks of the one TP / SP group read the batches, draw the noise and sample the prompts of the 1-process
run, so the logged losses, the samples and the exported weights equal those of the same run on 1 process."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infra.distributed import free_port
from run_helpers import start_from_checkpoint_of, steps_after
from test_t2v_train import ENV, ROOT, logged_losses, make_t2v_assets, read_frames

STEPS = 3
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None \
    and importlib.util.find_spec("megatron.core") is not None
# A few steps with sampling (2 denoising steps) at the end; the tiny DiT has 4 heads, 24 text and 12 video tokens.
# Adam's update and gradient clipping are blind to the gradients' scale (a missing SP loss scale would pass), so the
# runs use an eps far above the gradients and no clipping: the update is then ~ lr * gradient.
COMMON = [f"run.max_steps={STEPS}", "run.eval_every=0", "run.save_every=0", "sampling.prompts=[\"a red circle\"]",
          "optimizer.eps=1.0", "optimizer.lr=1.0", "deepspeed.gradient_clipping=0.0"]


def _train(config, out, *overrides, nproc=1):
    args = ["--config", str(config), f"run.output_dir={out}", *COMMON, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dit.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               "-m", "dit.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_t2v_assets(tmp_path_factory.mktemp("t2v_parallel"))


@pytest.fixture(scope="module")
def single(config):
    return _train(config, config.parent / "single")


def _assert_same_run(parallel, single):
    ours, theirs = logged_losses(parallel), logged_losses(single)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:  # float round-off of the collectives only
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-7), (step, ours, theirs)
    assert len(set(theirs.values())) == STEPS  # the losses really change (the weights do get updated)
    # The exported (EMA) weights: a TP run gathers its shards into the dense model.
    dense = load_file(str(next((single / "dit").glob("*.safetensors"))))
    exported = load_file(str(next((parallel / "dit").glob("*.safetensors"))))
    assert exported.keys() == dense.keys()
    for name, value in dense.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # One writer per group, and the final sample of the same seed. Not pixel-exact: after 3 steps of the random
    # tiny VAE/DiT, float round-off alone moves pixels by ~2 levels on average (two 1-process samplings of the same
    # weights, in training and by tools/sample_t2v, differ by 1.6), while another seed differs by ~28.
    videos = sorted(p.name for p in (parallel / f"samples/step_{STEPS:06d}").iterdir())
    assert videos == ["prompt_00.mp4"]
    a, b = (read_frames(run / f"samples/step_{STEPS:06d}/prompt_00.mp4").astype(int) for run in (parallel, single))
    assert np.abs(a - b).mean() < 5.0


def test_sequence_parallel_run_equals_single_process(config, single):
    _assert_same_run(_train(config, config.parent / "sp2", "parallel.sequence_parallel_size=2", nproc=2), single)


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("megatron", marks=pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core not installed")),
])
def test_tensor_parallel_run_equals_single_process(config, single, backend):
    out = _train(config, config.parent / f"tp2_{backend}", "parallel.tensor_parallel_size=2",
                 f"parallel.tensor_parallel_backend={backend}", nproc=2)
    _assert_same_run(out, single)
    # DeepSpeed wrote one model file per TP rank (through the mpu), the shards of the DiT.
    assert (out / f"checkpoints/step_{STEPS:06d}/dit/mp_rank_01_model_states.pt").is_file()


def test_parallel_config_is_validated(config):
    from infra.config import ConfigError, load_config
    from dit.train_config import T2VTrainConfig

    for override, key in [("parallel.tensor_parallel_size=3", "parallel"),  # 4 heads
                          ("parallel.sequence_parallel_size=5", "parallel"),
                          ("parallel.tensor_parallel_backend=jax", "parallel.tensor_parallel_backend"),
                          ("parallel.sequence_parallel_size=0", "parallel.sequence_parallel_size")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(T2VTrainConfig, config, [override])
    from dit.parallelize import check_layout

    cfg = load_config(T2VTrainConfig, config, ["parallel.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"^parallel: .*world size 3"):
        check_layout(cfg, world_size=3)
    check_layout(cfg, world_size=4)
    # With the first stage known, the video tokens Ulysses splits: 3 latent frames x 1 token cannot go over 2 ranks.
    stage = type("Stage", (), {"latent_channels": 8, "spatial_compression": 16,
                               "latent_shape": lambda self, f, h, w: (8, 1 + (f - 1) // 4, h // 16, w // 16)})()
    cfg = load_config(T2VTrainConfig, config, ["parallel.sequence_parallel_size=2", "data.num_frames=9",
                                               "data.height=16", "data.width=16", "model.patch_size=1"])
    with pytest.raises(ConfigError, match=r"^parallel\.sequence_parallel_size: a training clip .* 3 video tokens"):
        check_layout(cfg, world_size=2, first_stage=stage)


def test_tensor_parallel_resume_with_ema_equals_uninterrupted(config):
    """Each TP rank keeps its own EMA shards in the checkpoint, so a TP run resumed from one equals the same run
    uninterrupted: losses, and the exported EMA weights (gathered from the shards)."""
    tp = ["parallel.tensor_parallel_size=2", "parallel.tensor_parallel_backend=torch", "run.save_every=2"]
    whole = _train(config, config.parent / "tp2_whole", *tp, nproc=2)
    parts = config.parent / "tp2_parts"
    ckpt = start_from_checkpoint_of(whole, parts, 2)
    a, b = (load_file(str(ckpt / f"tensors_rank{r}.safetensors")) for r in (0, 1))
    assert not (ckpt / "tensors.safetensors").exists()
    assert any(k.startswith("ema.") for k in a) and any(not torch.equal(a[k], b[k]) for k in a if k.startswith("ema."))
    _train(config, parts, *tp, nproc=2)
    assert logged_losses(parts) == steps_after(logged_losses(whole), 2) != {}
    ours, theirs = (load_file(str(next((run / "dit").glob("*.safetensors")))) for run in (parts, whole))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)


def test_tensor_sequence_and_zero3_together_on_four_ranks_equal_one_process(config, single):
    """TP 2 x SP 2 on 4 ranks under ZeRO-3 (partitioning every parameter: persistence threshold 0): the forward
    (step 1's loss), the next steps' losses, the exported EMA weights and the sample equal the 1-process run."""
    out = _train(config, config.parent / "tp2_sp2_zero3", "parallel.tensor_parallel_size=2",
                 "parallel.sequence_parallel_size=2", "parallel.tensor_parallel_backend=torch",
                 "deepspeed.zero_stage=3", "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
                 nproc=4)
    _assert_same_run(out, single)
