"""Run configuration: one YAML per run, ``key=value`` overrides, validated against declared dataclass schemas.

Every section of a run's YAML maps onto a dataclass. OmegaConf rejects unknown keys and wrong types; each dataclass's
``validate(prefix)`` rejects impossible values. One protocol: ``prefix`` is the section's full dotted key in the run
config ("model.encoder"), and every error names ``join_key(prefix, field)`` through ``check``, so the full key
appears exactly once. ``load_config`` walks the tree (children first) passing each section its key, and re-raises
every error as ``ConfigError`` naming the file too, so a bad run fails at start-up, not hours in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and the source file."""


def join_key(prefix: str, name: str) -> str:
    """The full dotted key of field ``name`` in the section at ``prefix`` ("" at the top)."""
    return f"{prefix}.{name}" if prefix else name


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ValueError`` naming ``key`` when ``condition`` is false (used by the schemas' validate())."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def check_frames(num_frames: int, key: str) -> None:
    check(num_frames >= 1 and (num_frames - 1) % 4 == 0, key, f"must be 1 + 4k (1, 5, 9, 17, ...), got {num_frames}")


# ----------------------------------------------------------------------------------------------- shared sections


@dataclass
class OptimizerConfig:
    """One optimizer; the schedule is warm-up then cosine (the SSVAE recipe), all values in absolute learning rates."""

    type: str = "adamw"  # adam | adamw
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    decay_steps: int = 0  # cosine decay length after warm-up; 0 keeps the rate constant
    min_lr: float = 0.0

    def validate(self, prefix: str = "optimizer") -> None:
        check(self.type in ("adam", "adamw"), f"{prefix}.type", f"must be 'adam' or 'adamw', got {self.type!r}")
        check(self.lr > 0, f"{prefix}.lr", f"must be positive, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0 and self.decay_steps >= 0, f"{prefix}.warmup_steps/decay_steps", "must be >= 0")
        check(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")


OPTIMIZER_KERNELS = ("auto", "torch", "yes", "no")  # deepspeed.fused_optimizer


@dataclass
class DeepSpeedConfig:
    """The ``deepspeed:`` section: what DeepSpeed does with every engine of the run."""

    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # 0 disables clipping
    # Which Adam(W) kernel: torch | yes (DeepSpeed's FusedAdam, JIT-built at start-up) | no (torch's default,
    # multi-tensor) | auto (torch on GPU: torch's fused kernel needs no build; no elsewhere).
    fused_optimizer: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DeepSpeed JSON config

    def validate(self, prefix: str = "deepspeed") -> None:
        check(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.precision in ("fp32", "bf16"), f"{prefix}.precision",
              f"must be 'fp32' or 'bf16', got {self.precision!r}")
        check(self.gradient_accumulation_steps >= 1, f"{prefix}.gradient_accumulation_steps", "must be >= 1")
        check(self.gradient_clipping >= 0, f"{prefix}.gradient_clipping", "must be >= 0")
        # YAML reads a bare yes/no as a boolean, which the str field then holds as 'True'/'False'.
        self.fused_optimizer = {"True": "yes", "False": "no"}.get(self.fused_optimizer, self.fused_optimizer)
        check(self.fused_optimizer in OPTIMIZER_KERNELS, f"{prefix}.fused_optimizer",
              f"must be one of {OPTIMIZER_KERNELS}, got {self.fused_optimizer!r}")


@dataclass
class RunConfig:
    """The ``run:`` section: where outputs go and how long and how often things happen."""

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_at_start: bool = False  # also evaluate before the first step (a baseline for the curves)
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | none | <path to a checkpoint folder>
    ema_decay: float = 0.0  # 0 disables EMA
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ssvae-stack"
    progress_bar: bool = True
    stop_after: int = 0  # stop (as if interrupted) after this step; 0 = run to max_steps. Used to test resume.
    profile_at: int = 0  # profile steps profile_at .. + profile_steps - 1 into <output_dir>/profile (0: off)
    profile_steps: int = 3

    def validate(self, prefix: str = "run") -> None:
        check(self.max_steps >= 1, f"{prefix}.max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        check(self.eval_every >= 0 and self.save_every >= 0, f"{prefix}.eval_every/save_every", "must be >= 0")
        check(self.keep_last >= 1, f"{prefix}.keep_last", "must be >= 1")
        check(0.0 <= self.ema_decay < 1.0, f"{prefix}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.stop_after >= 0, f"{prefix}.stop_after", "must be >= 0")
        check(self.profile_at >= 0 and self.profile_steps >= 1, f"{prefix}.profile_at/profile_steps",
              f"must be >= 0 and >= 1, got {self.profile_at} and {self.profile_steps}")


# ----------------------------------------------------------------------------------------------------- loading


def _validate_tree(obj: Any, prefix: str = "") -> None:
    """Call validate(prefix) on every dataclass in the tree, children first, so the deepest error is reported."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _validate_tree(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                _validate_tree(item, f"{key}[{i}]")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)


def _missing_values(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is the literal ``???`` (OmegaConf does not always flag a YAML ``???`` merged into a schema)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_values(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_values(v, f"{prefix}[{i}]")]
    return [prefix] if node == "???" else []


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``schema`` from a YAML file plus ``key=value`` overrides; raise ``ConfigError`` naming key and file."""
    source = str(path) if path else "<defaults>"
    try:
        cfg = OmegaConf.structured(schema)
        required: set[str] = set()
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            yaml = OmegaConf.load(path)
            # A YAML value of ??? marks a key the user must supply; merging would silently keep the default.
            required = set(_missing_values(OmegaConf.to_container(yaml)))
            cfg = OmegaConf.merge(cfg, yaml)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must be key=value, got {bad} (config {source})")
            valued = [o for o in overrides if o.split("=", 1)[1] != ""]
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(valued))
            for override in overrides:
                key, value = override.split("=", 1)
                if value == "":  # "key=": an empty string for a text field, None (null) for any other
                    current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
                    OmegaConf.update(cfg, key, "" if isinstance(current, str) else None, merge=True)
            required -= {o.split("=", 1)[0] for o in overrides}
        missing = sorted(set(OmegaConf.missing_keys(cfg)) | required)
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{source}: bad key {key!r}: {first_line}") from None
    try:
        _validate_tree(obj)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return obj


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config object (to store beside checkpoints and logs)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


__all__ = ["MISSING", "ConfigError", "DeepSpeedConfig", "OptimizerConfig", "RunConfig", "check", "check_frames",
           "load_config", "save_config", "to_dict"]
