"""Latent caching: the cache holds what the first stage and text encoder give, resumes shard by shard, refuses mixing;
its loader keeps the start_batch contract and the shard loader's plan, so training on it equals on-the-fly training."""
import json

import pytest
import torch

from run_helpers import start_from_checkpoint_of, steps_after
from test_t2v_train import logged_losses, run_t2v, t2v_config  # noqa: F401  (t2v_config is a fixture)


def _load(config_path, *overrides):
    from infra.config import load_config
    from dit.train_config import T2VTrainConfig

    return load_config(T2VTrainConfig, config_path, list(overrides))


@pytest.fixture(scope="module")
def cache(t2v_config):
    from dit.latent_cache import cache_latents

    return cache_latents(_load(t2v_config), t2v_config.parent / "cache", batch_size=3, show_progress=False)


def test_cache_holds_first_stage_latents_text_and_ground_truth(t2v_config, cache):
    from dit.latent_cache import LatentCache
    from dit.runtime import build_first_stage, build_frozen_text_encoder, encode_text
    from infra.data.eval_clips import load_eval_clips

    cfg = _load(t2v_config)
    latents = LatentCache(cache)
    assert len(latents) == 8 and sorted(p.name for p in cache.glob("part-*")) == [
        "part-000000.jsonl", "part-000000.safetensors", "part-000001.jsonl", "part-000001.safetensors"]
    clips = load_eval_clips(cfg.data.video_roots, 8, 9, 8.0, 32, 32, "pyav")
    assert [latents.load(i)["meta"]["key"] for i in range(8)] == [m["key"] for m in clips["meta"]]  # source order
    sample = latents.load(5)
    assert sample["meta"]["truth"] == clips["meta"][5]["truth"] and sample["caption"] == clips["caption"][5]
    device = torch.device("cpu")
    expected = build_first_stage(cfg, device).encode(clips["video"][5:6])[0]
    assert sample["latents"].shape == (8, 3, 2, 2)
    torch.testing.assert_close(sample["latents"], expected, atol=1e-5, rtol=1e-4)
    states, mask = encode_text(build_frozen_text_encoder(cfg, device), [clips["caption"][5]], device)
    assert torch.equal(sample["text_mask"], mask[0]) and not mask[0].all()  # padded to max_length, mask kept
    torch.testing.assert_close(sample["text_states"], states[0], atol=1e-5, rtol=1e-4)
    # The posterior's log-variance, in normalised units: log var - 2 log s for the VAE's per-channel std s.
    assert "latents_logvar" not in sample  # loaded only when training samples the posterior
    vae = build_first_stage(cfg, device).vae
    posterior = vae.posterior(clips["video"][5:6])
    expected = posterior.logvar[0] - 2 * vae.latent_std.log().view(-1, 1, 1, 1)
    torch.testing.assert_close(LatentCache(cache, posterior=True).load(5)["latents_logvar"], expected, atol=1e-4,
                               rtol=1e-4)


def test_cache_resumes_only_missing_shards_and_refuses_other_settings(t2v_config, cache, monkeypatch):
    import dit.latent_cache as tool
    from dit.latent_cache import LatentCache

    before = [LatentCache(cache).load(i)["latents"] for i in range(8)]
    first_part = (cache / "part-000000.safetensors").stat().st_mtime_ns
    for name in ("part-000001.jsonl", "part-000001.safetensors", "COMPLETE"):
        (cache / name).unlink()
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        LatentCache(cache)
    decoded = []
    original = tool.load_or_skip
    monkeypatch.setattr(tool, "load_or_skip", lambda record, *a: decoded.append(record.key) or original(record, *a))
    tool.cache_latents(_load(t2v_config), cache, batch_size=3, show_progress=False)
    assert decoded == ["v0000004", "v0000005", "v0000006", "v0000007"]  # only the missing shard
    assert (cache / "part-000000.safetensors").stat().st_mtime_ns == first_part
    after = [LatentCache(cache).load(i)["latents"] for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="other settings"):
        tool.cache_latents(_load(t2v_config, "data.num_frames=5"), cache, show_progress=False)


def test_latent_loader_resumes_and_follows_the_shard_loader_plan(t2v_config, cache):
    from dit.latent_cache import build_latent_loader
    from infra.data.dataset import build_loader

    cfg = _load(t2v_config)
    stream = iter(build_latent_loader(cache, 3, seed=7))
    batches = [next(stream) for _ in range(5)]
    resumed = next(iter(build_latent_loader(cache, 3, seed=7, start_batch=3)))
    assert resumed["step"] == 3 and resumed["meta"] == batches[3]["meta"]
    assert torch.equal(resumed["latents"], batches[3]["latents"])
    assert torch.equal(resumed["text_states"], batches[3]["text_states"])
    cfg.data.video_batch_size = 3
    shards = iter(build_loader(cfg.data, seed=7))
    for batch in batches:  # the same samples, step by step, as the on-the-fly loader
        assert [m["key"] for m in batch["meta"]] == [m["key"] for m in next(shards)["meta"]]
    # Two ranks share out one epoch (8 samples = 2 steps x 2 ranks x 2) without a duplicate: rank r reads global
    # batches r and r + 2.
    loaders = [iter(build_latent_loader(cache, 2, rank, 2, seed=1)) for rank in (0, 1)]
    firsts = [[next(loader) for _ in (0, 1)] for loader in loaders]
    assert [[b["step"] for b in rank] for rank in firsts] == [[0, 2], [1, 3]]
    keys = [m["key"] for rank in firsts for batch in rank for m in batch["meta"]]
    assert sorted(keys) == [f"v{i:07d}" for i in range(8)]


def test_training_on_cached_latents_equals_on_the_fly(t2v_config, cache):
    fly, cached = t2v_config.parent / "fly", t2v_config.parent / "cached"
    common = ("run.max_steps=3", "sampling.enabled=false", "run.ema_decay=0")
    run_t2v(t2v_config, fly, *common)
    run_t2v(t2v_config, cached, *common, f"latents.cache_dir={cache}")
    a, b = logged_losses(fly), logged_losses(cached)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a[1] == pytest.approx(b[1], rel=1e-5)  # same clips, noise, timesteps and caption drops
    assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-4)
    state = json.loads((cached / "checkpoints/step_000003/trainer_state.json").read_text())
    assert state["data_position"] == 3


def test_a_control_cache_is_its_source_seen_through_the_transform(t2v_config, cache, tmp_path):
    """transform_cache re-expresses a cache through a latent transform: what encoding through the transformed first
    stage gives, captions and text states untouched; a cache from another first stage is refused."""
    from dit.latent_cache import LatentCache, read_manifest
    from dit.runtime import build_first_stage
    from infra.data.eval_clips import load_eval_clips
    from dit.latent_cache import transform_cache
    from vae.latent_transform import CheckerboardSign

    path = CheckerboardSign(cell=1).save(tmp_path / "checker.safetensors")
    cfg = _load(t2v_config, f"first_stage.latent_transform={path}")
    out = transform_cache(cache, tmp_path / "controlled", cfg)
    source, controlled = LatentCache(cache), LatentCache(out)
    assert len(controlled) == len(source) == 8
    assert read_manifest(out)["first_stage"]["latent_transform"] == str(path)
    assert read_manifest(out)["posterior"] is False  # a channel-mixing transform leaves no diagonal posterior
    with pytest.raises(ValueError, match="holds posterior means only"):
        LatentCache(out, posterior=True)
    clips = load_eval_clips(cfg.data.video_roots, 8, 9, 8.0, 32, 32, "pyav")
    expected = build_first_stage(cfg, torch.device("cpu")).encode(clips["video"][2:3])[0]
    torch.testing.assert_close(controlled.load(2)["latents"], expected, atol=1e-5, rtol=1e-4)
    for field in ("text_states", "text_mask"):
        assert torch.equal(controlled.load(2)[field], source.load(2)[field])
    assert controlled.load(2)["meta"] == source.load(2)["meta"]
    with pytest.raises(ValueError, match="other settings"):
        transform_cache(cache, tmp_path / "other", _load(t2v_config, f"first_stage.latent_transform={path}",
                                                          "data.num_frames=5"))
    with pytest.raises(ValueError, match="names no transform"):
        transform_cache(cache, tmp_path / "none", _load(t2v_config))


def test_keyed_caches_are_reused_and_posterior_sampling_resumes_exactly(t2v_config, cache, tmp_path):
    """latents.cache_root: the run writes the cache keyed by its data, VAE and text encoder (the same contents as a
    cache made by hand), the next run finds it instead of encoding; latents.sample draws new latents from the
    cached posterior every step, from the step's generator, so a resumed run equals an uninterrupted one."""
    import shutil

    from dit.latent_cache import COMPLETE, LatentCache, cache_key, keyed_cache_dir
    from vae.model import SSVAE

    cfg = _load(t2v_config)
    root = tmp_path / "caches"
    common = ("run.max_steps=3", "run.save_every=1", "sampling.enabled=false", "run.ema_decay=0",
              f"latents.cache_root={root}", "latents.sample=true")
    first = run_t2v(t2v_config, tmp_path / "whole", *common)
    keyed = keyed_cache_dir(cfg, root)
    assert (keyed / COMPLETE).is_file() and [p.name for p in root.iterdir()] == [keyed.name]
    assert "encoding the data once" in first.stderr
    by_hand, found = LatentCache(cache, posterior=True), LatentCache(keyed, posterior=True)
    for i in range(8):  # the same encoding (by hand 3 clips per batch, in the run 4: equal up to float rounding)
        for field in ("latents", "latents_logvar"):
            torch.testing.assert_close(found.load(i)[field], by_hand.load(i)[field], atol=1e-5, rtol=1e-4)
    start_from_checkpoint_of(tmp_path / "whole", tmp_path / "parts", 1)
    resumed = run_t2v(t2v_config, tmp_path / "parts", *common)
    assert "reused" in resumed.stderr and "encoding the data once" not in resumed.stderr
    sampled = logged_losses(tmp_path / "whole")
    assert logged_losses(tmp_path / "parts") == steps_after(sampled, 1) != {}  # exact resume
    means = logged_losses(t2v_config.parent / "cached") if (t2v_config.parent / "cached").exists() else None
    if means is not None:  # the mean-latent run of test_training_on_cached_latents_equals_on_the_fly
        assert all(sampled[k] != means[k] for k in sampled)  # the draws differ from the means
    # The key follows the weights and the clips, not where the VAE folder lives.
    moved = tmp_path / "vae_copy"
    shutil.copytree(cfg.first_stage.path, moved)
    assert cache_key(_load(t2v_config, f"first_stage.path={moved}")) == keyed.name
    assert cache_key(_load(t2v_config, "data.num_frames=5")) != keyed.name
    vae = SSVAE.from_pretrained(moved)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    vae.save_pretrained(moved)
    assert cache_key(_load(t2v_config, f"first_stage.path={moved}")) != keyed.name


def test_a_weighted_root_is_refused_by_the_cache_naming_the_key(tmp_path):
    """The cache's loader draws each cached clip once per epoch, so a root weight (``path*N``) would silently not
    apply: refused before any work."""
    from types import SimpleNamespace

    from dit.latent_cache import cache_latents

    cfg = SimpleNamespace(data=SimpleNamespace(video_roots="data/default, data/real_train*20"))
    with pytest.raises(ValueError, match=r"^data\.video_roots: the latent cache does not apply root weights "
                                         r"\(data/real_train\*20\)"):
        cache_latents(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
