"""Kill a training N times, resume it each time, and check that it ends exactly where an uninterrupted run ends.

Point it at your own config: it runs the training once uninterrupted (the reference), then again, killing it with
SIGKILL (the whole process group: launcher and every rank) at random moments, half of them while a checkpoint is
being written, and restarting it with ``run.resume=auto`` after each kill. It then compares every logged loss of every
attempt with the reference's at the same step, and the final step reached.

    python -m tools.fault_inject --module dit.train --config configs/t2v/tiny.yaml --kills 5 \\
        --work /tmp/faults run.max_steps=60
    # on a cluster node, through the launcher your jobs use:
    python -m tools.fault_inject --module dit.train --config my.yaml --launcher deepspeed --nproc 8 --kills 10

Both runs get ``run.log_every=1`` and ``run.save_every=--save-every`` so that there is something to resume from and
every step is compared. It prints a JSON report (and writes ``<work>/report.json``); the exit status is 0 only when
every loss matched. Losses are compared bit for bit: the trainings here resume exactly, so any difference is a bug
(``--tolerance`` relaxes it, e.g. for non-deterministic GPU kernels).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from infra.child_env import python_child_env
from infra.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def launch_command(module: str, config: str, overrides: list[str], launcher: str, nproc: int) -> list[str]:
    args = ["--config", config, *overrides]
    if launcher == "python":
        return [sys.executable, "-m", module, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", module, *args]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", module, *args]
    raise ValueError(f"--launcher must be python, torchrun or deepspeed, got {launcher!r}")


def read_rows(metrics: Path) -> list[dict]:
    """Every complete row of a metrics.jsonl (a row cut by a kill is left out)."""
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def loss_rows(rows: list[dict]) -> list[tuple[int, dict[str, float]]]:
    return [(r["step"], {k: v for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
            for r in rows if any("loss" in k for k in r)]


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _saving(checkpoints: Path) -> bool:
    return checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


def run_with_kills(cmd: list[str], out: Path, kills: int, duration: float, rng: random.Random, env: dict,
                   timeout: float) -> list[dict]:
    """Run ``cmd`` to the end, SIGKILLing it ``kills`` times; returns what each kill hit."""
    log, checkpoints, events = out / "fault_inject.log", out / "checkpoints", []
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=kills, desc="kills", unit="kill") as bar:
        for k in range(kills + 1):
            proc = _start(cmd, log, env)
            if k == kills:
                if proc.wait(timeout=timeout) != 0:
                    raise RuntimeError(f"the last resumed run failed with exit code {proc.returncode}; see {log}")
                break
            during_save = k % 2 == 1
            deadline = time.time() + rng.uniform(0.2, 0.6) * duration
            while proc.poll() is None:
                if (during_save and _saving(checkpoints)) or (not during_save and time.time() >= deadline):
                    break
                if time.time() > deadline + timeout:
                    break
                time.sleep(0.005 if during_save else 0.05)
            if proc.poll() is not None:  # finished before the kill: nothing more to interrupt
                events.append({"kill": k, "skipped": f"the run ended first (exit {proc.returncode})"})
                if proc.returncode != 0:
                    raise RuntimeError(f"run {k} failed with exit code {proc.returncode}; see {log}")
                break
            steps = [s for s, _ in loss_rows(read_rows(out / "metrics.jsonl"))]
            hit = {"kill": k, "during_save": _saving(checkpoints), "last_logged_step": max(steps, default=0)}
            _kill_group(proc)
            events.append(hit)
            bar.update(1)
    return events


def compare(reference: list[tuple[int, dict]], faulty: list[tuple[int, dict]], tolerance: float) -> list[str]:
    """Every row of the faulty run against the reference's at the same step; plus the last step reached."""
    expected = {step: losses for step, losses in reference}
    problems = []
    for step, losses in faulty:
        if step not in expected:
            problems.append(f"step {step}: logged by the interrupted run, not by the reference")
            continue
        for key, value in losses.items():
            want = expected[step].get(key)
            if want is None or not (value == want or (tolerance and math.isclose(value, want, rel_tol=tolerance,
                                                                                  abs_tol=tolerance))):
                problems.append(f"step {step} {key}: {value!r} after faults, {want!r} uninterrupted")
    last_ref = max(expected, default=0)
    last = max((s for s, _ in faulty), default=0)
    if last != last_ref:
        problems.append(f"the interrupted run ended at step {last}, the reference at {last_ref}")
    return problems


def fault_inject(module: str, config: str, overrides: list[str], work: Path, kills: int, seed: int = 0,
                 launcher: str = "python", nproc: int = 1, save_every: int = 2, tolerance: float = 0.0,
                 timeout: float = 3600.0) -> dict:
    work = Path(work)
    if work.exists():
        shutil.rmtree(work)
    env = python_child_env(PYTHONUNBUFFERED="1")
    common = [*overrides, "run.log_every=1", f"run.save_every={save_every}", "run.progress_bar=false"]
    reference, faulty = work / "reference", work / "faulty"
    reference.mkdir(parents=True)
    start = time.time()
    cmd = launch_command(module, config, [*common, f"run.output_dir={reference}"], launcher, nproc)
    proc = _start(cmd, reference / "fault_inject.log", env)
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); see {reference / 'fault_inject.log'}")
    duration = time.time() - start
    cmd = launch_command(module, config, [*common, f"run.output_dir={faulty}", "run.resume=auto"], launcher, nproc)
    events = run_with_kills(cmd, faulty, kills, duration, random.Random(seed), env, timeout)
    ref_rows = loss_rows(read_rows(reference / "metrics.jsonl"))
    problems = compare(ref_rows, loss_rows(read_rows(faulty / "metrics.jsonl")), tolerance)
    report = {"module": module, "config": config, "overrides": overrides, "launcher": launcher, "nproc": nproc,
              "kills": events, "kills_during_save": sum(bool(e.get("during_save")) for e in events),
              "reference_steps": len(ref_rows), "reference_seconds": round(duration, 1),
              "equal": not problems, "problems": problems[:50], "work": str(work)}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", required=True, help="training entry point, e.g. dit.train or vae.train")
    parser.add_argument("--config", required=True)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--work", default="runs/fault_inject", help="folder for both runs (emptied first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--launcher", default="python", choices=["python", "torchrun", "deepspeed"])
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node for torchrun / deepspeed")
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.0, help="relative tolerance (0: bit for bit)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills must be >= 1, got {args.kills}")
    report = fault_inject(args.module, args.config, args.overrides, Path(args.work), args.kills, args.seed,
                          args.launcher, args.nproc, args.save_every, args.tolerance)
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["equal"] else 1)


if __name__ == "__main__":
    main()
