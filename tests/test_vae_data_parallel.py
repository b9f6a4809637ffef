"""The SSVAE's released-recipe losses on several ranks (gloo, CPU): LMR, LCR with its adaptive weight, the PatchGAN
with its adaptive weight, images and videos, every rank drawing differently. A run on W ranks equals the same global
batches on 1 rank with W accumulation steps: losses step by step and the exported weights.

Before the fix the 2-rank run died at its first backward pass (gloo: "Received data size doesn't match expected
size"): LMR's mask token had no gradient on a rank that drew mask ratio 0. Making the ranks agree also needed
rank-free data order and draws (infra.data.sampling, infra.batch_generator) and one spectral-norm power iteration
per step instead of one per discriminator forward (vae.discriminator.iterate_per_step).
"""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from infra.distributed import free_port
from multinode_helpers import run_nodes
from test_vae_train import ENV, ROOT

STEPS = 4
# 32x32 clips of 9 frames from PyTorch's default initialisation; the LCR hinge above the untrained latents'
# correlation so LCR (and its adaptive weight) acts; the discriminator from step 1 on, so steps alternate
# generator / discriminator with the GAN's adaptive weight; half the batches images. LMR at its 256p settings.
RECIPE = ["data.num_frames=9", "data.height=32", "data.width=32", "data.resize=0", "data.crop=center",
          "data.video_batch_size=2", "data.image_batch_size=2", "data.image_prob=0.5", "data.num_workers=0",
          "loss.disc_weight=1.0", "loss.disc_start=1", "loss.discriminator.max_spatial_down=4",
          "loss.discriminator.ndf=8", "loss.lcr.thresh=0.99",
          *[f"model.{part}.{key}" for part in ("encoder", "decoder")
            for key in ("boundary_shortcuts=false", "init=default")], "model.encoder.logvar_init=0.0",
          "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.decay_steps=0",
          "disc_optimizer.warmup_steps=0", "disc_optimizer.decay_steps=0",
          f"run.max_steps={STEPS}", "run.log_every=1", "run.eval_every=0", "run.progress_bar=false",
          "eval.num_clips=1", "eval.write_videos=false"]


@pytest.fixture(scope="module")
def data(generated_clips):
    return generated_clips(32)


def train(out, data, nproc: int, zero: int, accumulation: int, *extra):
    args = ["--config", str(ROOT / "configs/vae/tiny.yaml"), f"run.output_dir={out}", f"data.video_roots={data}",
            f"data.image_roots={data}", f"eval.video_roots={data}", *RECIPE, f"deepspeed.zero_stage={zero}",
            f"deepspeed.gradient_accumulation_steps={accumulation}", *extra]
    launcher = [sys.executable, "-m", "vae.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "vae.train"]
    proc = subprocess.run(launcher + args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{launcher + args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(rows):
    """Per step: the generator's total loss or the discriminator's (averaged over the ranks by the trainer)."""
    return {r["step"]: r.get("loss/total", r.get("loss/disc")) for r in rows if "loss/total" in r or "loss/disc" in r}


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: 1 rank, the global batch of W ranks as W accumulation steps."""
    runs = {w: tmp_path_factory.mktemp(f"one_rank_acc{w}") for w in (2, 4)}
    return {w: (out, train(out, data, 1, 2, w)) for w, out in runs.items()}


def exported(run):
    return load_file(str(next((run / "model").glob("*.safetensors"))))


# ZeRO 1 and 2 on 2 ranks, ZeRO-2 on 4 (4 processes on 2 cores cost 20 s a run; ZeRO-1 and 2 share DeepSpeed's code
# path, and 4-rank ZeRO-1 was measured equal too). ZeRO-3 is refused, see below.
@pytest.mark.parametrize("nproc,zero", [(2, 1), (2, 2), (4, 2)])
def test_released_recipe_on_several_ranks_equals_one_rank(data, single, tmp_path, nproc, zero):
    rows = train(tmp_path, data, nproc, zero, 1)
    reference, reference_rows = single[nproc]
    ours, theirs = losses(rows), losses(reference_rows)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    # Float round-off of the gradient all-reduce only (measured: equal to 7 significant digits).
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours, theirs)
    # The ranks really drew differently: one step averaged an image batch and a video batch, and the logged mask
    # ratio is a mean of different draws.
    assert any("loss_image" in r and "loss_video" in r for r in rows)
    assert any(r.get("lmr/mask_ratio", 0) not in (0.0, 0.25, 0.5, 0.75) for r in rows)
    # LCR and the GAN acted.
    assert any(r.get("loss/lcr", 0) > 0 for r in rows) and any(r.get("loss/gan_generator", 0) != 0 for r in rows)
    ours, theirs = exported(tmp_path), exported(reference)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_two_node_agents_train_the_vae_like_one_rank(data, single, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on 127.0.0.1, one rank per node agent): the released recipe's losses
    equal the 1-rank run with the same global batch, as 2 ranks on one node do."""
    args = ["--config", str(ROOT / "configs/vae/tiny.yaml"), f"run.output_dir={tmp_path}", f"data.video_roots={data}",
            f"data.image_roots={data}", f"eval.video_roots={data}", *RECIPE, "deepspeed.zero_stage=2"]
    run_nodes(["-m", "vae.train", *args])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ours, theirs = losses(rows), losses(single[2][1])
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours, theirs)


def test_zero3_is_refused_with_the_key_named():
    from infra.config import ConfigError, load_config
    from vae.train_config import VAETrainConfig

    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: the VAE trains with ZeRO 0, 1 or 2, got 3"):
        load_config(VAETrainConfig, ROOT / "configs/vae/tiny.yaml", ["deepspeed.zero_stage=3"])
