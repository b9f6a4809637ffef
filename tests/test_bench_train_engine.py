"""The engine benchmark's arithmetic: resume compared step by step after the checkpoint, step-time medians past the
warm-up, and MFU from the model FLOPs (its GPU runs cannot be checked here; its CPU dry run is bench/gpu_suite.sh)."""
import pytest

from bench.bench_train_engine import speed, summarize


def _rows(losses, key="loss", start=1, **extra):
    return [{"step": start + i, key: v, "step_s": 1.0 + i, "samples_per_s": 2.0, **extra}
            for i, v in enumerate(losses)]


def test_resume_is_compared_only_after_the_checkpoint():
    whole = _rows([4.0, 3.0, 2.0, 1.0])
    same = summarize("dit", whole, _rows([9.0, 9.0, 2.0, 1.0]), save_at=2)
    assert same["resume"] == {"compared_steps": [3, 4], "max_abs_diff": 0.0, "bit_identical": True}
    off = summarize("dit", whole, _rows([4.0, 3.0, 2.0, 1.5]), save_at=2)
    assert off["resume"]["max_abs_diff"] == 0.5 and not off["resume"]["bit_identical"]
    assert same["loss_first_third_mean"] == 4.0 and same["loss_last_third_mean"] == 1.0


def test_vae_losses_skip_the_discriminator_steps():
    rows = _rows([2.0, 1.0], key="loss/total") + [{"step": 3, "loss/disc": 1.0}]
    out = summarize("vae", rows, [], save_at=1)
    assert out["steps_logged"] == 2 and out["losses_finite"] and out["resume"]["compared_steps"] == []
    assert not out["resume"]["bit_identical"]  # nothing compared is not a pass


def test_speed_takes_the_median_after_warmup_and_mfu_from_model_flops():
    rows = _rows([1.0] * 5, **{"mem/peak_gib": 3.0})  # step_s 1, 2, 3, 4, 5
    info = {"model_flops_per_step": 790e12 * 4.0, "batch": 2, "video_tokens": 100, "text_tokens": 10}
    out = speed("dit", rows, info, warmup=2)
    assert out["step_s_median"] == 4.0 and out["peak_memory_gib"] == 3.0
    assert out["mfu_vs_measured_790"] == pytest.approx(1.0)
    assert out["tokens_per_s"] == pytest.approx(2 * 110 / 4.0)
    assert "mfu_vs_measured_790" not in speed("vae", rows, {}, warmup=2)


def test_profiled_steps_are_left_out_of_the_step_time():
    rows = _rows([1.0] * 6)  # step_s 1 .. 6
    assert speed("vae", rows, {}, warmup=2)["step_s_median"] == 4.5  # steps 3..6
    assert speed("vae", rows, {}, warmup=2, profiled_from=5)["step_s_median"] == 3.5  # steps 3, 4
