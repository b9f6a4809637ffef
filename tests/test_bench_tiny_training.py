"""bench.bench_tiny_training runs on the shipped tiny configs (it broke once when the VAE's model section grew a
``kind``) and reports what it says it measures."""
import torch

from bench.bench_tiny_training import main


def test_one_step_of_each_model_is_timed(capsys):
    threads = torch.get_num_threads()
    try:
        out = main(["--steps", "1", "--warmup", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert '"tiny_dit"' in capsys.readouterr().out  # the JSON is printed
    for name in ("tiny_vae", "anchor_old_tiny_vae", "tiny_dit"):
        assert out[name]["s_per_step"] > 0 and out[name]["clips_per_s"] > 0, name
    assert out["anchor_old_tiny_vae"]["spatial_compression"] == 16 and out["tiny_vae"]["spatial_compression"] == 4
    assert out["tiny_vae_pixels_per_s_vs_anchor"] > 0
