"""The DiT's tensor and sequence parallelism in one place: one function checks a layout, one applies it.

``check_layout`` holds every check of a TP x SP layout against a run (torchtitan's ``ParallelDims`` plays this
part): the sizes against the world, the heads each rank keeps, the text length and the video tokens Ulysses splits,
and dropout under TP. The config's own validation runs the part that needs no world or first stage, and the training
runs the rest at start-up, so an impossible layout stops a run before any engine is built.

``parallelize_dit`` builds the process groups and applies the layout to a built (dense) DiT, returning what the
training needs: the model (its attention and MLP linears sharded over TP; under SP, ``apply_ulysses`` makes it a
``UlyssesTransformer``, whose forward splits the tokens, with the same parameter names), the groups, DeepSpeed's
model-parallel unit, and the dense config for exporting. The model code knows nothing of either
(docs/PARALLELISM.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from infra.config import ConfigError, check
from infra.distributed import ParallelGroups, parallel_groups

from .config import DiTConfig
from .sequence_parallel import apply_ulysses
from .tensor_parallel import DeepSpeedMPU, apply_tensor_parallel
from .transformer import CogVideoXTransformer

if TYPE_CHECKING:  # the run schema validates with check_layout: no import at run time, no cycle
    from .train_config import T2VTrainConfig


def check_layout(cfg: T2VTrainConfig, world_size: Optional[int] = None, first_stage: Any = None) -> None:
    """Every check of ``cfg.parallel`` against the run; ``world_size`` and ``first_stage`` (when known) add the
    checks that need them. ValueError (from the config's validation) or ConfigError, naming the key."""
    p = cfg.parallel
    size = p.model_parallel_size
    if world_size is not None:
        if world_size % size:
            raise ConfigError(f"parallel: tensor_parallel_size {p.tensor_parallel_size} x sequence_parallel_size "
                              f"{p.sequence_parallel_size} must divide the world size {world_size}")
    if size == 1:
        return
    dit = DiTConfig.preset(cfg.model.preset, **dict(cfg.model.overrides))
    # Ulysses splits the heads TP leaves on a rank again over SP; TP splits heads and the MLP width.
    check(dit.num_attention_heads % size == 0, "parallel",
          f"model heads ({dit.num_attention_heads}) must divide by tensor_parallel_size x sequence_parallel_size = "
          f"{size}")
    check(cfg.text_encoder.max_length % p.sequence_parallel_size == 0, "parallel.sequence_parallel_size",
          f"text_encoder.max_length ({cfg.text_encoder.max_length}) must divide by it")
    check(p.tensor_parallel_size == 1 or dit.dropout == 0.0, "parallel.tensor_parallel_size",
          f"tensor parallelism needs model dropout 0, got {dit.dropout}")
    if first_stage is None or p.sequence_parallel_size == 1:
        return
    d = cfg.data
    shapes = [((d.num_frames, d.height, d.width), "a training clip (data.num_frames/height/width)")]
    if d.image_prob > 0:
        shapes.append(((1, d.height, d.width), "a training image (data.height/width)"))
    if cfg.sampling.enabled:
        shapes.append((cfg.sample_shape(), "a sample (sampling.*)"))
    built = cfg.model.build(first_stage.latent_channels, first_stage.spatial_compression, 1, 1)
    for (frames, height, width), what in shapes:
        tokens = video_tokens(built, first_stage, frames, height, width)
        if tokens % p.sequence_parallel_size:
            raise ConfigError(f"parallel.sequence_parallel_size: {what} has {tokens} video tokens, not divisible by "
                              f"{p.sequence_parallel_size}")


def video_tokens(dit: DiTConfig, first_stage: Any, frames: int, height: int, width: int) -> int:
    """The DiT's video token count for a (frames, height, width) clip through ``first_stage``."""
    _, f, h, w = first_stage.latent_shape(frames, height, width)
    return -(-f // dit.temporal_patch) * (h // dit.patch_size) * (w // dit.patch_size)


@dataclass
class ParallelDiT:
    model: CogVideoXTransformer  # sharded / routed through Ulysses as the layout says
    groups: ParallelGroups
    mpu: Any  # DeepSpeed's model-parallel unit under TP, else None
    dense_config: DiTConfig  # the unsharded model's config (a TP model is gathered into it for export)


def parallelize_dit(model: CogVideoXTransformer, cfg: T2VTrainConfig, world_size: int,
                    first_stage: Any = None, device=None) -> ParallelDiT:
    """Check the layout, build the groups (collective: every rank calls it) and apply TP then SP to ``model``."""
    check_layout(cfg, world_size, first_stage)
    p = cfg.parallel
    groups = parallel_groups(p.tensor_parallel_size, p.sequence_parallel_size)
    dense_config = model.config
    mpu = None
    if groups.tensor_parallel_size > 1:
        if device is not None:  # the shards are cut on the rank's device (NCCL needs them there)
            model.to(device)
        apply_tensor_parallel(model, groups.tp_group, backend=p.tensor_parallel_backend)
        mpu = DeepSpeedMPU(groups.tp_group, groups.dp_group)
    if groups.sequence_parallel_size > 1:
        # Every rank of the group passes the same inputs and gets the full output through the model's ordinary call.
        apply_ulysses(model, groups.sp_group)
    return ParallelDiT(model, groups, mpu, dense_config)
