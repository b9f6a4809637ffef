"""A resumable stage runner: each stage runs once per configuration, and a re-run skips what is already done.

A stage is a name, a JSON-able ``config`` (everything its outputs depend on, upstream stages' hashes included) and a
function returning its outputs (a JSON-able dict). After the function succeeds, ``<root>/<name>.json`` is written
atomically with ``status: done``, the config, its hash, the outputs and the wall time. Next time:

- marker ``done`` with the same hash: skipped, the stored outputs are returned;
- marker with another hash (the config changed, or a run of another config was interrupted): the stage's ``clean``
  paths are deleted first (so a training does not resume from a checkpoint of another configuration), then it runs;
- marker ``running`` with the same hash (interrupted): it runs again without cleaning, so trainings and caches that
  resume by themselves pick up where they stopped.

Downstream stages put ``result.hash`` of their inputs into their own config, so a changed upstream stage re-runs
everything that depends on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("tools.stages")


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able value (dict key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    outputs: dict
    hash: str
    wall_s: float  # seconds of the run that produced the outputs (also when skipped now)
    skipped: bool


class StageRunner:
    """Runs named stages under ``root`` (one marker JSON per stage)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.results: dict[str, StageResult] = {}

    def marker_path(self, name: str) -> Path:
        # Stage names may hold '/' (e.g. "lcr/vae"); markers stay flat and readable.
        return self.root / (name.replace("/", "__") + ".json")

    def read_marker(self, name: str) -> dict | None:
        path = self.marker_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_marker(self, name: str, record: dict) -> None:
        path = self.marker_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    def run(self, name: str, config: Any, fn: Callable[[], dict], clean: Iterable[str | Path] = ()) -> StageResult:
        """Run ``fn`` unless stage ``name`` is done with this ``config``; returns its (stored or new) outputs."""
        digest = config_hash(config)
        marker = self.read_marker(name)
        if marker and marker.get("status") == "done" and marker.get("hash") == digest:
            log.info("stage %s: done already (%s), skipped", name, digest)
            result = StageResult(name, marker["outputs"], digest, float(marker.get("wall_s", 0.0)), True)
            self.results[name] = result
            return result
        if marker and marker.get("hash") != digest:
            log.info("stage %s: configuration changed (%s -> %s), its outputs are redone", name, marker.get("hash"),
                     digest)
            for path in clean:
                path = Path(path)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        log.info("stage %s: running", name)
        self._write_marker(name, {"name": name, "status": "running", "hash": digest, "config": config,
                                  "started": time.time()})
        start = time.perf_counter()
        outputs = fn()
        wall = time.perf_counter() - start
        if not isinstance(outputs, dict):
            raise TypeError(f"stage {name} must return a dict of outputs, got {type(outputs).__name__}")
        self._write_marker(name, {"name": name, "status": "done", "hash": digest, "config": config,
                                  "outputs": outputs, "wall_s": wall, "finished": time.time()})
        log.info("stage %s: done in %.1f s", name, wall)
        result = StageResult(name, outputs, digest, wall, False)
        self.results[name] = result
        return result
