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
from infra.preemption import EXIT_PREEMPTED
from infra.schedule import learning_rate
from run_helpers import logged_losses, logged_steps, start_from_checkpoint_of, steps_after, wait_for

HELPERS = Path(__file__).parent / "helpers"
ROOT = Path(__file__).resolve().parents[1]
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


def test_resume_equals_uninterrupted_zero2_two_processes(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(whole, "deepspeed.zero_stage=2", "run.save_every=3", nproc=2)
    copy = start_from_checkpoint_of(whole, parts, 3)
    assert (copy / "model/zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    _run(parts, "deepspeed.zero_stage=2", "run.save_every=3", nproc=2)
    a, b = logged_losses(whole), logged_losses(parts)
    assert sorted(a) == list(range(1, 7))
    assert b == steps_after(a, 3) and sorted(b) == [4, 5, 6]  # every loss after the resume, bit for bit
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
    assert logged_losses(crashed) == logged_losses(whole)


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
    _run(whole, "deepspeed.gradient_accumulation_steps=2", "run.save_every=3")
    copy = start_from_checkpoint_of(whole, parts, 3)
    state = json.loads((copy / "trainer_state.json").read_text())
    assert state["data_position"] == 6  # two micro-batches per optimizer step
    _run(parts, "deepspeed.gradient_accumulation_steps=2", "run.save_every=3")
    assert logged_losses(parts) == steps_after(logged_losses(whole), 3) != {}


def test_torch_fused_adamw_kernel_is_used_and_trains_the_same(one_process_group):
    """deepspeed.fused_optimizer=torch hands DeepSpeed torch's fused AdamW kernel (no JIT build, unlike FusedAdam):
    the same updates as the default multi-tensor kernel up to float rounding."""
    import torch

    from infra.config import DeepSpeedConfig
    from infra.engine import build_engine

    weights = {}
    for kernel in ("torch", "no"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        initial = model[0].weight.detach().clone()
        engine = build_engine(model, DeepSpeedConfig(zero_stage=2, precision="fp32", fused_optimizer=kernel),
                              OptimizerConfig(lr=1e-2), 1)
        assert engine.optimizer.optimizer.defaults.get("fused") is (True if kernel == "torch" else None)
        data = torch.Generator().manual_seed(1)
        for _ in range(4):
            loss = engine(torch.randn(5, 8, generator=data)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        weights[kernel] = [p.detach().clone() for p in engine.module.parameters()]
        assert not torch.equal(weights[kernel][0], initial)  # it trained
    for fused, plain in zip(weights["torch"], weights["no"]):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


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
    """run.profile_at records exactly the configured steps (the trainer calls start(step) before and stop(step)
    after each step) and writes the operator table and the trace."""
    import torch

    from infra.step_profiler import StepProfiler

    profiler = StepProfiler(tmp_path, first_step=2, num_steps=2)
    x = torch.randn(64, 64)
    for step in range(1, 6):
        profiler.start(step)
        (x @ x if step in (2, 3) else x + x).sum()
        profiler.stop(step)
    ops = (tmp_path / "profile/ops.txt").read_text()
    assert ops.startswith("steps 2..3, sorted by self_cpu_time_total")
    assert "aten::mm" in ops and "aten::add" not in ops  # the steps in the window, and only those
    assert json.loads((tmp_path / "profile/trace.json").read_text())["traceEvents"]
    assert not StepProfiler(tmp_path / "off", first_step=0, num_steps=3).enabled


def test_universal_conversion_from_a_process_whose_openmp_pool_runs_does_not_hang(tmp_path):
    """A resume at another world size converts the checkpoint with DeepSpeed's converter, which forks workers. Forked
    from a training process whose OpenMP pool had started (any run on 2+ threads), they hung for ever in their first
    parallel op (a 2-rank VAE checkpoint resumed on 1 rank with 2 threads did); the conversion now runs in a fresh
    one-thread process. The caller here starts its pool first, as training does; the 2-rank checkpoint's partitions
    are large enough (hidden 16384) for the workers' copies to run in parallel."""
    run = tmp_path / "run"
    _run(run, "run.max_steps=1", "run.save_every=1", "hidden=16384", nproc=2)
    engine_dir = run / "checkpoints/step_000001/model"
    out = tmp_path / "universal"
    probe = ("import sys, torch; from pathlib import Path; torch.set_num_threads(2); "
             "(torch.randn(1500, 1500) @ torch.randn(1500, 1500)).sum(); "
             "from infra.reshard import convert_to_universal; convert_to_universal(Path(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", probe, str(engine_dir), str(out)], env={**ENV, "OMP_NUM_THREADS": "2"},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "COMPLETE").is_file() and (out / "zero").is_dir()


def test_a_child_process_imports_this_checkout_from_anywhere(tmp_path, monkeypatch):
    """``python_child_env``: the stack's root first on PYTHONPATH (before the caller's), then the overrides."""
    from infra.child_env import ROOT as STACK_ROOT, python_child_env

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = python_child_env(OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(STACK_ROOT), "/elsewhere"] and env["OMP_NUM_THREADS"] == "1"
    proc = subprocess.run([sys.executable, "-c", "import infra.reshard, sys; print(infra.reshard.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == str(STACK_ROOT / "infra" / "reshard.py"), proc.stderr


ENGINES_AT_TEARDOWN = """
import gc, sys
import torch.distributed as dist
sys.path.insert(0, {helpers!r})
from toy_task import ToyConfig, ToyTask
from deepspeed import DeepSpeedEngine
from infra.trainer import run_training

destroy = dist.destroy_process_group
def counting_destroy(*args, **kwargs):
    print("engines alive:", sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects()))
    destroy(*args, **kwargs)
dist.destroy_process_group = counting_destroy
run_training(ToyConfig, ToyTask, sys.argv[1:])
"""


@pytest.mark.parametrize("preempt", [False, True], ids=["finished", "preempted"])
def test_the_engines_are_freed_before_the_process_group_goes(tmp_path, preempt):
    """Left to the interpreter's exit, DeepSpeed's engines (and their gloo work) can be freed by a gloo thread after
    Python is gone, which aborts a finished 2-rank run (SIGABRT). They are freed before destroy_process_group, on a
    finished run and on a preempted one. (Under ZeRO-3 DeepSpeed itself still holds one until exit: see Trainer.release.)"""
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("run:\n  seed: 3\n  log_every: 1\n  max_steps: 4\n")
    cmd = [sys.executable, "-c", ENGINES_AT_TEARDOWN.format(helpers=str(HELPERS)), "--config", str(cfg),
           f"run.output_dir={tmp_path / 'run'}", "run.progress_bar=false",
           *(["run.max_steps=1000", "step_sleep=0.1"] if preempt else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if preempt:
        wait_for(lambda: logged_steps(tmp_path / "run") >= 1 or proc.poll() is not None, timeout=120)
        proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == (EXIT_PREEMPTED if preempt else 0), out[-3000:]
    assert "engines alive: 0" in out, out[-3000:]
