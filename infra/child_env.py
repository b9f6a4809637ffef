"""The environment of a Python process this stack starts (a training, a conversion, a benchmark's worker): the
parent's, with the stack's root first on PYTHONPATH so ``python -m infra...``/``vae...``/``dit...`` import this
checkout whether or not it is installed and whatever the working directory."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_child_env(**overrides: str) -> dict[str, str]:
    """``os.environ`` with ROOT prepended to PYTHONPATH, then ``overrides`` (e.g. OMP_NUM_THREADS="1")."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **overrides}
