"""Checkpoints that verify themselves and fall back, preemption that never looks like completion, and no pickle-running
script in a checkpoint. The toy trainer (tests/helpers/toy_task.py) stands in for both trainings: they share it."""
import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.checkpoint import (CheckpointDiskFull, CheckpointManager, RECOVERY_SCRIPTS, verify_checkpoint,
                              write_manifest)
from infra.distributed import free_port
from infra.preemption import EXIT_PREEMPTED
from run_helpers import logged_losses, logged_steps, wait_for
from test_trainer import ENV, HELPERS, _run


def _cmd(out: Path, *overrides: str, torchrun: bool = False) -> list[str]:
    cfg = out.parent / "toy.yaml"
    cfg.write_text("run:\n  seed: 3\n  log_every: 1\n  max_steps: 6\n  ema_decay: 0.9\n")
    args = ["--config", str(cfg), f"run.output_dir={out}", "run.progress_bar=false", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
    return [*(launcher if torchrun else [sys.executable]), str(HELPERS / "toy_task.py"), *args]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Checkpoints at steps 2, 4, 6 of an 8-step run stopped at 6, and the uninterrupted 8-step losses."""
    root = tmp_path_factory.mktemp("ckpt")
    whole = root / "whole"
    _run(whole, "run.max_steps=8", "run.save_every=2")
    parts = root / "parts"
    _run(parts, "run.max_steps=8", "run.save_every=2", "run.stop_after=6")
    return parts, logged_losses(whole)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped_model_bytes": lambda c: _flip(c / "model/mp_rank_00_model_states.pt"),
    "flipped_optimizer_bytes": lambda c: _flip(next((c / "model").glob("*optim_states.pt"))),
    "flipped_ema_bytes": lambda c: _flip(c / "tensors.safetensors"),
    "rng_deleted": lambda c: (c / "rng_rank0.json").unlink(),
    "model_states_deleted": lambda c: (c / "model/mp_rank_00_model_states.pt").unlink(),
    "truncated_trainer_state": lambda c: (c / "trainer_state.json").write_text('{"step": 6, "data_'),
    "manifest_deleted": lambda c: (c / "MANIFEST.json").unlink(),
    "ema_deleted": lambda c: (c / "tensors.safetensors").unlink(),
}


def test_a_checkpoint_has_a_manifest_that_verifies_and_no_recovery_script(saved_run):
    parts, _ = saved_run
    for step in (2, 4, 6):
        folder = parts / f"checkpoints/step_{step:06d}"
        assert verify_checkpoint(folder) == []
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert "trainer_state.json" in manifest["files"] and "rng_rank0.json" in manifest["files"]
        assert not [p for script in RECOVERY_SCRIPTS for p in folder.rglob(script)]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_found_by_the_manifest_naming_the_file(saved_run, tmp_path, damage):
    folder = _copy(saved_run[0] / "checkpoints/step_000006", tmp_path / "step_000006")
    DAMAGE[damage](folder)
    problems = verify_checkpoint(folder)
    assert len(problems) == 1 and str(folder) in problems[0]


@pytest.mark.parametrize("damage", ["flipped_optimizer_bytes", "rng_deleted", "truncated_trainer_state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_and_resumes_exactly(saved_run, tmp_path, damage):
    parts, whole_losses = saved_run
    run = _copy(parts, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints/step_000006")
    proc = _run(run, "run.max_steps=8", "run.save_every=2")
    assert "step_000006 does not verify" in proc.stderr and "falling back" in proc.stderr
    assert "resumed from" in proc.stderr and "step_000004 at step 4" in proc.stderr
    assert logged_losses(run) == whole_losses  # steps 5 and 6 redone, bit for bit


def test_no_verifying_checkpoint_stops_with_every_bad_file_named(saved_run, tmp_path):
    run = _copy(saved_run[0], tmp_path / "run")
    for step, damage in ((2, "rng_deleted"), (4, "flipped_model_bytes"), (6, "manifest_deleted")):
        DAMAGE[damage](run / f"checkpoints/step_{step:06d}")
    proc = _run(run, "run.max_steps=8", "run.save_every=2", check=False)
    assert proc.returncode != 0 and "no checkpoint can be resumed from" in proc.stderr
    assert proc.stderr.count("does not verify:") >= 3
    for name in ("step_000002/rng_rank0.json", "step_000004/model/mp_rank_00_model_states.pt",
                 "step_000006/MANIFEST.json"):
        assert name in proc.stderr


def test_an_explicit_resume_from_a_damaged_checkpoint_is_refused(saved_run, tmp_path):
    run = _copy(saved_run[0], tmp_path / "run")
    target = run / "checkpoints/step_000004"
    DAMAGE["flipped_ema_bytes"](target)
    proc = _run(run, f"run.resume={target}", check=False)
    assert proc.returncode != 0 and "tensors.safetensors: SHA-256 differs" in proc.stderr


def test_sigterm_checkpoints_exits_preempted_exports_nothing_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    _run(whole, "run.max_steps=30")
    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(out, "run.max_steps=30", "step_sleep=0.1"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM received" in err and "no final export" in err
    assert not (out / "export.txt").exists()
    saved = CheckpointManager(out / "checkpoints").latest()
    assert saved is not None and 3 <= int(saved.name[5:]) < 30
    _run(out, "run.max_steps=30")
    assert (out / "export.txt").is_file() and logged_losses(out) == logged_losses(whole)


def test_a_trainer_whose_launcher_dies_checkpoints_and_stops(tmp_path):
    out = tmp_path / "orphan"
    launcher = subprocess.Popen(_cmd(out, "run.max_steps=400", "step_sleep=0.1", torchrun=True), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: logged_steps(out) >= 3, timeout=120)
    launcher.kill()  # SIGKILL: the launcher cannot pass anything on to its trainer
    launcher.wait()
    wait_for(lambda: CheckpointManager(out / "checkpoints").latest() is not None, timeout=60)
    steps_at_stop = logged_steps(out)
    time.sleep(1.5)
    assert logged_steps(out) == steps_at_stop < 400  # it stopped, it did not train on to the end
    assert not (out / "export.txt").exists()


def test_disk_full_says_where_how_much_and_the_last_good_checkpoint(saved_run, tmp_path, monkeypatch):
    run = _copy(saved_run[0], tmp_path / "run")
    manager = CheckpointManager(run / "checkpoints")
    tmp = run / "checkpoints/.tmp-step_000008"
    tmp.mkdir()
    (tmp / "partial.bin").write_bytes(b"x" * 1000)
    error = RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                         "data/0: file write failed; basic_ios::clear: iostream error")
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(CheckpointDiskFull) as info:
        manager._raise_if_disk_full(error, tmp, 8)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "disk full" in message and str(tmp) in message
    assert "step_000006" in message and "MiB" in message
    assert not tmp.exists()  # the half-written checkpoint's space is given back


def test_a_failure_with_space_left_is_not_called_disk_full(saved_run, tmp_path):
    manager = CheckpointManager(saved_run[0] / "checkpoints")
    manager._raise_if_disk_full(RuntimeError("something else"), tmp_path / ".tmp-step_000008", 8)  # no raise


def test_manifest_lists_nested_files(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/x.pt").write_bytes(b"123")
    (tmp_path / "COMPLETE").write_text("1\n")
    manifest = write_manifest(tmp_path)
    assert list(manifest["files"]) == ["a/b/x.pt"] and verify_checkpoint(tmp_path) == []


def test_a_preempted_study_stage_is_not_done_and_runs_again(tmp_path, monkeypatch):
    import types

    from tools.stages import StageRunner
    from tools.study import StagePreempted, Study

    (tmp_path / "fake_trainer.py").write_text(
        "import pathlib, sys\n"
        "runs = pathlib.Path(sys.argv[-1]).with_suffix('.runs')\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        f"sys.exit({EXIT_PREEMPTED} if len(runs.read_text()) == 1 else 0)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    from tools.study_config import LauncherConfig

    study = types.SimpleNamespace(cfg=types.SimpleNamespace(launcher=LauncherConfig(kind="python", omp_threads=1)))
    config = tmp_path / "child.yaml"
    runner = StageRunner(tmp_path / "stages")

    def stage():
        Study.launch(study, "fake_trainer", config, tmp_path / "child.log")
        return {"ok": True}

    with pytest.raises(StagePreempted, match="preempted .*run the study again"):
        runner.run("variant/seed0/dit", {"a": 1}, stage)
    assert runner.read_marker("variant/seed0/dit")["status"] == "running"
    result = runner.run("variant/seed0/dit", {"a": 1}, stage)  # the next study run: the stage runs again
    assert not result.skipped and runner.read_marker("variant/seed0/dit")["status"] == "done"
    assert (tmp_path / "child.runs").read_text() == "xx"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_safe_export_reads_weights_only_and_matches_the_trained_model(tmp_path, zero_stage):
    import torch
    from safetensors.torch import load_file

    from infra.export_checkpoint import export_checkpoint

    out = tmp_path / "run"
    _run(out, f"deepspeed.zero_stage={zero_stage}", "run.max_steps=2", *(["run.ema_decay=0"] * (zero_stage == 3)))
    checkpoint = out / "checkpoints/step_000002"
    master = load_file(str(export_checkpoint(checkpoint, "model", tmp_path / "master.safetensors")))
    assert set(master) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    if zero_stage == 3:  # partitioned parameters, gathered from every rank's optimizer file
        assert master["0.weight"].shape == (32, 8)
        return
    ema = load_file(str(export_checkpoint(checkpoint, "model", tmp_path / "ema.safetensors", ema=True)))
    assert set(master) == set(ema) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert all(master[k].dtype == torch.float32 and master[k].shape == ema[k].shape for k in master)
    assert not all(torch.equal(master[k], ema[k]) for k in master)  # two different copies, both read
    _flip(checkpoint / "tensors.safetensors")
    with pytest.raises(Exception, match="does not verify"):
        export_checkpoint(checkpoint, "model", tmp_path / "x.safetensors", ema=True)
