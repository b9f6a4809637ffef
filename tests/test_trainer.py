"""The shared trainer: exact resume under ZeRO-2 with 2 processes, atomic checkpoints, non-finite-loss skipping."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infra.distributed import free_port

from infra.config import OptimizerConfig
from infra.schedule import learning_rate

HELPERS = Path(__file__).parent / "helpers"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(out: Path, *overrides: str, nproc: int = 1, script: str = "toy_task.py", env=None, check=True):
    cfg = out.parent / "toy.yaml"
    cfg.write_text("run:\n  seed: 3\n  log_every: 1\n  max_steps: 6\n  ema_decay: 0.9\n")
    args = ["--config", str(cfg), f"run.output_dir={out}", "run.progress_bar=false", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(HELPERS / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={str(free_port())}",
               str(HELPERS / script), *args]
    proc = subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_equals_uninterrupted_zero2_two_processes(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(whole, "deepspeed.zero_stage=2", nproc=2)
    _run(parts, "deepspeed.zero_stage=2", "run.stop_after=3", nproc=2)
    assert (parts / "checkpoints/step_000003/model/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    _run(parts, "deepspeed.zero_stage=2", nproc=2)
    a, b = _losses(whole), _losses(parts)
    assert sorted(a) == list(range(1, 7))
    assert a == b  # every loss, before and after the interruption, bit for bit
    assert len(set(a.values())) == 6  # and the losses really change from step to step


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    _run(whole, "run.save_every=2")
    proc = _run(crashed, "run.save_every=2", script="crash_during_save.py", env={"CRASH_AT_SAVE": "2"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = crashed / "checkpoints"
    assert (ckpts / "step_000002/COMPLETE").is_file()
    assert (ckpts / ".tmp-step_000004").is_dir() and not (ckpts / "step_000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    _run(crashed, "run.save_every=2")  # resume=auto ignores the torn checkpoint
    assert _losses(crashed) == _losses(whole)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    out = tmp_path / "nan"
    _run(out, "nan_at_step=2", "run.max_steps=4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_nonfinite"] for r in rows if "skipped_nonfinite" in r}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 1
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float) and r["step"] != 3)
    state = json.loads((out / "checkpoints/step_000004/trainer_state.json").read_text())
    assert state["skipped_nonfinite"] == 1


def test_resume_from_missing_checkpoint_names_it(tmp_path):
    proc = _run(tmp_path / "x", f"run.resume={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "COMPLETE" in proc.stderr


def test_warmup_cosine_schedule():
    opt = OptimizerConfig(lr=5e-5, warmup_steps=1000, warmup_start_lr=2e-6, decay_steps=600_000, min_lr=2e-6)
    assert learning_rate(opt, 0) == pytest.approx(2e-6)
    assert learning_rate(opt, 500) == pytest.approx((2e-6 + 5e-5) / 2)
    assert learning_rate(opt, 1000) == pytest.approx(5e-5)
    assert learning_rate(opt, 1000 + 300_000) == pytest.approx((5e-5 + 2e-6) / 2)
    assert learning_rate(opt, 10**7) == pytest.approx(2e-6)


def test_gradient_accumulation_resume_is_exact(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(whole, "deepspeed.gradient_accumulation_steps=2")
    _run(parts, "deepspeed.gradient_accumulation_steps=2", "run.stop_after=3")
    state = json.loads((parts / "checkpoints/step_000003/trainer_state.json").read_text())
    assert state["data_position"] == 6  # two micro-batches per optimizer step
    _run(parts, "deepspeed.gradient_accumulation_steps=2")
    assert _losses(whole) == _losses(parts)


def test_torch_fused_adamw_kernel_is_used_and_trains_the_same(tmp_path):
    """deepspeed.fused_optimizer=torch hands DeepSpeed torch's fused AdamW kernel (no JIT build, unlike FusedAdam):
    the same updates as the default multi-tensor kernel up to float rounding."""
    fused = _run(tmp_path / "fused", "deepspeed.fused_optimizer=torch")
    plain = _run(tmp_path / "plain", "deepspeed.fused_optimizer=no")
    assert "optimizer AdamW (deepspeed.fused_optimizer=torch: fused=True" in fused.stderr
    assert "fused=True" not in plain.stderr
    a, b = _losses(tmp_path / "fused"), _losses(tmp_path / "plain")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and len(set(a.values())) == 6
    assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-5)


def test_ema_update_is_the_per_parameter_lerp_of_trainable_weights():
    import torch

    from infra.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    assert "1.bias" not in expected
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in model.named_parameters():
            if name in expected:
                expected[name] = expected[name] + 0.1 * (p.detach() - expected[name])
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, atol=1e-6, rtol=0)
        assert not torch.equal(ema.shadow[name], dict(model.named_parameters())[name])  # an average, not a copy


def test_profiled_steps_write_an_operator_table_and_a_trace(tmp_path):
    _run(tmp_path / "prof", "run.profile_at=2", "run.profile_steps=2")
    ops = (tmp_path / "prof/profile/ops.txt").read_text()
    assert ops.startswith("steps 2..3, sorted by self_cpu_time_total") and "aten::" in ops
    assert json.loads((tmp_path / "prof/profile/trace.json").read_text())["traceEvents"]
    assert sorted(_losses(tmp_path / "prof")) == list(range(1, 7))  # training itself goes on unchanged
