"""What tests read from and do to a training run's output folder: its logged losses, and a resume without a third
launch (the interrupted run starts from a copy of the uninterrupted run's checkpoint, as a run stopped at that step
would: the checkpoint a periodic save wrote is the one a stop writes; the stop path itself is tested in
test_checkpoint_faults, test_multinode and test_reshard)."""
import json
import shutil
import time
from pathlib import Path


def logged_losses(out: Path) -> dict[int, float]:
    """{step: loss} from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start_from_checkpoint_of(whole: Path, parts: Path, step: int) -> Path:
    """Give ``parts`` only ``whole``'s complete checkpoint at ``step``, named latest; returns the copy."""
    name = f"step_{step:06d}"
    source = whole / "checkpoints" / name
    if not (source / "COMPLETE").is_file():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (the run's save_every / keep_last?)")
    target = parts / "checkpoints" / name
    shutil.copytree(source, target)
    (parts / "checkpoints" / "latest").write_text(name + "\n")
    return target


def steps_after(losses: dict, step: int) -> dict:
    """The entries of a {step: value} log after ``step``: what a resumed run logs itself."""
    return {s: v for s, v in losses.items() if s > step}


def logged_steps(out: Path) -> int:
    """How many steps the run has logged so far (0 before its metrics.jsonl exists)."""
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate`` every 0.1 s until it holds; TimeoutError after ``timeout`` seconds."""
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)
