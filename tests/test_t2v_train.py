"""Text-to-video training on the shared engine: the tiny run trains on CPU (tiny random SSVAE, MiniLM, tiny default
data), writes sample mp4s and a diffusers export, resumes exactly, and runs under the ``deepspeed`` launcher."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infra.distributed import free_port
from run_helpers import logged_losses, start_from_checkpoint_of, steps_after  # noqa: F401 (logged_losses: re-exported)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 24
PROMPTS = ["a red circle moves to the right", "a small green square stays still over a plain yellow background"]


def make_t2v_assets(root: Path) -> Path:
    """Tiny default data (2 shards of 4 nine-frame 32x32 videos), a tiny random SSVAE (16x space, 4x time, 8
    channels) and a run YAML using them with MiniLM captions; returns the YAML's path."""
    from tools.make_default_data import make_default_data
    from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
    from vae.model import SSVAE

    make_default_data(root / "data", num_videos=8, num_images=0, size=32, frames=9, fps=8, seed=0, shard_size=4,
                      show_progress=False)
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=1, z_channels=8)
    vae = SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common)))
    vae.set_latent_stats(torch.linspace(-0.05, 0.05, 8), torch.linspace(0.15, 0.25, 8))  # ~unit-scale latents
    vae.save_pretrained(root / "vae")
    config = {
        "run": {"output_dir": str(root / "run"), "seed": 3, "max_steps": STEPS, "log_every": 1,
                "eval_every": STEPS // 2, "ema_decay": 0.9, "progress_bar": False},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "gradient_clipping": 0.1},
        "data": {"video_roots": str(root / "data"), "image_prob": 0.0, "num_frames": 9, "fps": 8, "height": 32,
                 "width": 32, "video_batch_size": 4, "decoder": "pyav"},
        "first_stage": {"kind": "ssvae", "path": str(root / "vae")},
        "text_encoder": {"kind": "minilm", "max_length": 24},
        "model": {"preset": "tiny"},
        "diffusion": {"schedule": {"snr_shift_scale": 1.0}, "caption_dropout": 0.1},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "sampling": {"prompts": PROMPTS, "steps": 2, "guidance": 2.0},
    }
    path = root / "t2v.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def t2v_config(tmp_path_factory) -> Path:
    return make_t2v_assets(tmp_path_factory.mktemp("t2v"))


def run_t2v(config: Path, out: Path, *overrides: str, launcher: str = "python", timeout: int = 600):
    """Run ``dit.train`` in a fresh process (``launcher`` "python" or "deepspeed"); raise with its output on failure."""
    args = ["--config", str(config), f"run.output_dir={out}", *overrides]
    if launcher == "python":
        cmd = [sys.executable, "-m", "dit.train", *args]
    else:  # the deepspeed launcher works on CPU (DeepSpeed 0.19.8) with --num_gpus 1: one local process, gloo
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
               "--module", "dit.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def whole_run(t2v_config) -> Path:
    out = t2v_config.parent / "whole"
    run_t2v(t2v_config, out, "run.save_every=8")  # checkpoints at 8, 16, 24: the resume test starts from 16
    return out


# ------------------------------------------------------------------------------------------------------ config


def test_dit_shape_follows_first_stage_and_text_encoder():
    from dit.train_config import ModelConfig

    model = ModelConfig(preset="cogvideox-2b")
    ssvae = model.build(latent_channels=48, spatial_compression=16, text_embed_dim=4096, max_text_length=226)
    assert (ssvae.in_channels, ssvae.output_channels, ssvae.patch_size) == (48, 48, 1)
    assert (ssvae.sample_height, ssvae.sample_width) == (30, 45)  # 480x720 pixels, as CogVideoX
    cogvideox = model.build(16, 8, 4096, 226)
    assert (cogvideox.in_channels, cogvideox.patch_size, cogvideox.sample_height) == (16, 2, 60)
    tiny = ModelConfig(preset="tiny", patch_size=2).build(8, 16, 384, 16)
    assert (tiny.patch_size, tiny.text_embed_dim, tiny.max_text_seq_length) == (2, 384, 16)


def test_config_rejects_keys_typed_twice_and_bad_values(tmp_path):
    from infra.config import ConfigError, load_config
    from dit.train_config import T2VTrainConfig

    path = ROOT / "configs/t2v/tiny.yaml"
    for override, key in [("model.overrides.in_channels=4", "model.overrides"),
                          ("model.overrides.num_layerz=4", "model.overrides"),
                          ("sampling.sampler=euler", "sampling.sampler"),
                          ("diffusion.caption_dropout=1.5", "diffusion.caption_dropout"),
                          ("latents.cache_dir=x", "data.image_prob")]:
        overrides = [override] + (["data.image_prob=0.5", "data.image_roots=x"] if key == "data.image_prob" else [])
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(T2VTrainConfig, path, overrides)
    with pytest.raises(ConfigError, match="text_encoder.path"):  # the T5 folder must exist
        load_config(T2VTrainConfig, ROOT / "configs/t2v/cogvideox_5b_ssvae.yaml")
    cfg = load_config(T2VTrainConfig, ROOT / "configs/t2v/cogvideox_5b_ssvae.yaml", [f"text_encoder.path={tmp_path}"])
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.weight_decay == 1e-4
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.gradient_clipping == 0.1
    assert cfg.diffusion.caption_dropout == 0.1 and cfg.diffusion.schedule.snr_shift_scale == 1.0


# -------------------------------------------------------------------------------------------------- training


def test_tiny_run_loss_falls_and_writes_samples_and_export(whole_run):
    losses = logged_losses(whole_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    values = [losses[s] for s in sorted(losses)]
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.8 * first, (first, last, values)
    for step in (STEPS // 2, STEPS):
        videos = sorted((whole_run / f"samples/step_{step:06d}").glob("*.mp4"))
        assert [v.name for v in videos] == ["prompt_00.mp4", "prompt_01.mp4"]
        assert read_frames(videos[0]).shape == (9, 32, 32, 3)
    assert (whole_run / "dit/config.json").is_file()


def test_resume_equals_uninterrupted(t2v_config, whole_run):
    parts = t2v_config.parent / "parts"
    start_from_checkpoint_of(whole_run, parts, 16)
    run_t2v(t2v_config, parts, "run.save_every=8")
    assert logged_losses(parts) == steps_after(logged_losses(whole_run), 16) != {}  # bit for bit
    ours, theirs = (read_frames(run / f"samples/step_{STEPS:06d}/prompt_01.mp4") for run in (parts, whole_run))
    np.testing.assert_array_equal(ours, theirs)  # EMA restored: the same final samples


def test_standalone_sampling_matches_training_samples(t2v_config, whole_run, tmp_path):
    from tools.sample_t2v import main

    paths = main(["--run", str(whole_run), "--out", str(tmp_path), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]])
    assert [p.name for p in paths] == ["prompt_00.mp4", "prompt_01.mp4"]
    for p in paths:  # the exported EMA weights, the same seeds: the videos the run sampled at its last step
        trained = read_frames(whole_run / f"samples/step_{STEPS:06d}" / p.name).astype(int)
        diff = np.abs(read_frames(p).astype(int) - trained)
        # Float round-off between the two runs can flip an H.264 coding decision and move a few pixels by
        # tens of levels; a different model or seed moves the whole video.
        assert diff.mean() < 1.0, (diff.mean(), diff.max())


def test_dit_training_under_the_deepspeed_launcher_logs_index_and_batch_skips(t2v_config, tmp_path):
    """Launched as a cluster user would (the deepspeed launcher), a DiT training skips a bad meta line (found while
    indexing) and an undecodable mp4 (found while loading a batch), logs each per reason in metrics.jsonl, as the VAE
    training does, and checkpoints."""
    import shutil
    import tarfile

    data = tmp_path / "data"
    shutil.copytree(t2v_config.parent / "data", data)
    shard = sorted(data.glob("video-*.tar"))[0]
    meta = shard.with_name(shard.name.replace(".tar", ".meta.jsonl"))
    meta.write_text(meta.read_text() + "{not json\n")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = next(m.name for m, _ in members if m.name.endswith(".mp4"))
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name == broken:
                payload = b"\x00not an mp4" * 50
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    out = tmp_path / "run"
    run_t2v(t2v_config, out, f"data.video_roots={data}", "run.max_steps=3", "run.eval_every=0",
            "run.eval_at_start=false", "run.save_every=0", "sampling.enabled=false", launcher="deepspeed")
    assert sorted(logged_losses(out)) == [1, 2, 3]
    assert (out / "checkpoints/step_000003/dit/mp_rank_00_model_states.pt").is_file()  # the final save
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k: sum(r.get(k, 0.0) for r in rows) for r in rows for k in r if k.startswith("data/")}
    assert logged.get("data/index_skipped_bad_meta_line") == 1.0, logged
    assert logged.get("data/skipped_unreadable", 0.0) >= 1.0, logged
    # The end-of-training summary names the shard by path, with its counts per reason, for both kinds of skip.
    report = json.loads((out / "skipped_shards.json").read_text())
    assert report["indexing"] == {str(shard): {"bad_meta_line": 1}}
    assert report["training"][str(shard)]["unreadable"] >= 1
