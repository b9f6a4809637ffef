"""The run schema of text-to-video training (``python -m dit.train --config configs/t2v/<file>.yaml``).

One YAML maps onto ``T2VTrainConfig``; every section is a typed dataclass, so a misspelt key fails at start-up.
What follows from another component is not typed twice: the DiT's ``in_channels`` comes from the first stage's
latent channels, its patch size from the first stage's spatial compression (16 pixels per token, as CogVideoX: patch
2 for an 8x VAE, 1 for a 16x VAE like SSVAE) unless ``model.patch_size`` is given, and its text width and length from
the text encoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from infra.config import DeepSpeedConfig, OptimizerConfig, RunConfig, check
from infra.data.config import DataConfig
from vae.first_stage import FirstStageConfig

from .config import PRESETS, DiTConfig
from .diffusion import DiffusionConfig
from .lora import LoraConfig
from .samplers import SAMPLERS
from .text_encoder import TextEncoderConfig
from .transformer import DIT_INITS

# DiTConfig keys that come from the first stage or the text encoder; setting them by hand would type them twice.
DERIVED_KEYS = ("in_channels", "out_channels", "text_embed_dim", "max_text_seq_length")


@dataclass
class ModelConfig:
    """The ``model:`` section: a DiT preset (``dit.config.PRESETS``) plus overrides of its other fields."""

    preset: str = "cogvideox-2b"
    patch_size: int = 0  # 0: from the first stage (16 // spatial_compression)
    gradient_checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # any other DiTConfig field, e.g. num_layers: 4
    # Initialisation of a DiT trained from scratch: "default" (PyTorch's, as diffusers builds it) or "adaln_zero"
    # (DiT's: every block's modulation and the output projection start at zero, so each block starts as the identity
    # and the model predicts 0; Peebles & Xie 2023 found it converges markedly faster). Loading weights ignores it.
    init: str = "default"

    def validate(self, prefix: str = "model") -> None:
        check(self.preset in PRESETS, f"{prefix}.preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check(self.init in DIT_INITS, f"{prefix}.init", f"must be one of {DIT_INITS}, got {self.init!r}")
        check(self.patch_size >= 0, f"{prefix}.patch_size", "must be >= 0 (0: from the first stage)")
        derived = sorted(set(self.overrides) & set(DERIVED_KEYS))
        check(not derived, f"{prefix}.overrides", f"{derived} follow from first_stage / text_encoder; do not set them")
        unknown = sorted(set(self.overrides) - {f.name for f in dataclasses.fields(DiTConfig)})
        check(not unknown, f"{prefix}.overrides", f"{unknown}: not DiTConfig fields")
        dataclasses.replace(PRESETS[self.preset], **dict(self.overrides)).validate(f"{prefix}.overrides")

    def build(self, latent_channels: int, spatial_compression: int, text_embed_dim: int,
              max_text_length: int) -> DiTConfig:
        """The DiTConfig for a first stage and a text encoder."""
        base = DiTConfig.preset(self.preset, **dict(self.overrides)).replace(
            text_embed_dim=text_embed_dim, max_text_seq_length=max_text_length,
            gradient_checkpointing=self.gradient_checkpointing)
        config = base.for_vae(latent_channels, spatial_compression)
        if self.patch_size and self.patch_size != config.patch_size:
            config = config.replace(patch_size=self.patch_size)
        return config


@dataclass
class ConditioningConfig:
    """The ``diffusion:`` section: the noise schedule and classifier-free-guidance training."""

    schedule: DiffusionConfig = field(default_factory=DiffusionConfig)  # snr_shift_scale 3 (2B) or 1 (5B)
    caption_dropout: float = 0.1  # captions replaced by zero embeddings (CogVideoX), what CFG samples against
    # Mask the text's padding tokens out of the DiT's attention. None: as the text encoder masks them (minilm yes;
    # t5 no: CogVideoX's transformer attends to all 226 T5 states, padding included).
    text_mask: bool | None = None

    def validate(self, prefix: str = "diffusion") -> None:
        check(0.0 <= self.caption_dropout <= 1.0, f"{prefix}.caption_dropout", "must be in [0, 1]")


@dataclass
class LatentsConfig:
    """The ``latents:`` section: encode each batch on the fly, or read latents cached by ``dit.latent_cache`` (``tools/cache_latents``)."""

    cache_dir: str = ""  # empty: encode on the fly with the first stage and the text encoder
    # A folder of caches named by what made them (dit.latent_cache.cache_key): the run uses the cache of its data,
    # first stage and text encoder there, and writes it first if no run has (on the main process while the others
    # wait at a barrier; for data sets that take longer than the process group's timeout to encode, write it first
    # with `tools.cache_latents --root`). Exclusive with cache_dir.
    cache_root: str = ""
    # Train on draws from the cached posterior, mean + exp(logvar / 2) * eps, new at every step; false: on its mean.
    sample: bool = False

    @property
    def cached(self) -> bool:
        return bool(self.cache_dir or self.cache_root)

    def validate(self, prefix: str = "latents") -> None:
        check(not (self.cache_dir and self.cache_root), f"{prefix}.cache_root",
              f"give latents.cache_dir (one cache) or latents.cache_root (a folder of keyed caches), not both")
        check(not self.sample or self.cached, f"{prefix}.sample",
              "draws from a cached posterior: set latents.cache_dir or latents.cache_root (on the fly, "
              "first_stage.sample=true samples the posterior while encoding)")


@dataclass
class SamplingConfig:
    """The ``sampling:`` section: fixed prompts sampled to mp4 every ``run.eval_every`` steps and at the end, into
    ``<output_dir>/samples/step_XXXXXX/``; also the defaults of ``tools/sample_t2v``."""

    enabled: bool = True
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving to the right on a blue background"])
    num_frames: int = 0  # pixel frames; 0: data.num_frames
    height: int = 0  # 0: data.height
    width: int = 0  # 0: data.width
    steps: int = 50
    guidance: float = 6.0
    dynamic_cfg: bool = False
    sampler: str = "ddim"  # ddim | dpm++
    seed: int = 42
    fps: float = 0.0  # 0: data.fps
    use_ema: bool = True  # sample with the EMA weights when run.ema_decay > 0

    def validate(self, prefix: str = "sampling") -> None:
        check(not self.enabled or len(self.prompts) > 0, f"{prefix}.prompts", "must hold at least one prompt")
        check(self.num_frames == 0 or (self.num_frames - 1) % 4 == 0, f"{prefix}.num_frames",
              f"must be 0 or 1 + 4k, got {self.num_frames}")
        check(self.height >= 0 and self.width >= 0, f"{prefix}.height/width", "must be >= 0")
        check(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        check(self.guidance >= 1.0, f"{prefix}.guidance", f"must be >= 1 (1: no guidance), got {self.guidance}")
        check(self.sampler in SAMPLERS, f"{prefix}.sampler", f"must be one of {SAMPLERS}, got {self.sampler!r}")
        check(self.fps >= 0, f"{prefix}.fps", "must be >= 0")


@dataclass
class ParallelConfig:
    """The ``parallel:`` section: DeepSpeed-Ulysses sequence parallelism and tensor parallelism of the DiT (see
    docs/PARALLELISM.md). The world is data x sequence x tensor parallel; the ranks of one TP x SP group read the
    same batches and draw the same noise, the data-parallel size is world / (TP x SP)."""

    sequence_parallel_size: int = 1
    tensor_parallel_size: int = 1
    tensor_parallel_backend: str = "torch"  # torch | megatron (megatron-core, pip install -e .[megatron])

    @property
    def model_parallel_size(self) -> int:
        return self.sequence_parallel_size * self.tensor_parallel_size

    def validate(self, prefix: str = "parallel") -> None:
        check(self.sequence_parallel_size >= 1, f"{prefix}.sequence_parallel_size", "must be >= 1")
        check(self.tensor_parallel_size >= 1, f"{prefix}.tensor_parallel_size", "must be >= 1")
        check(self.tensor_parallel_backend in ("torch", "megatron"), f"{prefix}.tensor_parallel_backend",
              f"must be torch or megatron, got {self.tensor_parallel_backend!r}")


def _cogvideox_optimizer() -> OptimizerConfig:
    # CogVideoX's SAT recipe: AdamW, betas (0.9, 0.95), weight decay 1e-4, short warm-up.
    return OptimizerConfig(type="adamw", lr=1e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-4, warmup_steps=100)


def _cogvideox_deepspeed() -> DeepSpeedConfig:
    # ZeRO-2 with gradient clipping 0.1, as CogVideoX trains.
    return DeepSpeedConfig(zero_stage=2, gradient_clipping=0.1)


@dataclass
class T2VTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=_cogvideox_deepspeed)
    data: DataConfig = field(default_factory=DataConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: ConditioningConfig = field(default_factory=ConditioningConfig)
    optimizer: OptimizerConfig = field(default_factory=_cogvideox_optimizer)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, prefix: str = "") -> None:
        from .parallelize import check_layout

        check_layout(self)  # what needs no world size or first stage; the rest at start-up
        if self.lora.enabled:
            check(self.parallel.tensor_parallel_size == 1, "lora.enabled",
                  "LoRA needs parallel.tensor_parallel_size=1 (tensor parallelism replaces the Linear layers the "
                  "adapters wrap)")
        if self.latents.cached:
            check(self.data.image_prob == 0.0, "data.image_prob",
                  "must be 0 with latents.cache_dir (the cache holds video clips only)")

    # Sampling sizes default to the training clip.
    def sample_shape(self) -> tuple[int, int, int]:
        s, d = self.sampling, self.data
        return s.num_frames or d.num_frames, s.height or d.height, s.width or d.width

    def sample_fps(self) -> float:
        return self.sampling.fps or self.data.fps
