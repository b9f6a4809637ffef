"""Checkpoint conversion: diffusers ``CogVideoXTransformer3DModel`` <-> ours <-> CogVideoX SAT.

Our parameter names are diffusers' own, so the diffusers conversion is a rename-free copy except for the
patch projection (diffusers' stride-p Conv2d kernel (D, C, p, p) is our Linear weight (D, C*p*p)). The SAT
mapping follows diffusers' ``scripts/convert_cogvideox_to_diffusers.py`` without importing
SwissArmyTransformer. Reading a diffusers folder does not import diffusers either: it is config.json plus
safetensors files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .config import DiTConfig
from .transformer import CogVideoXTransformer

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# diffusers counts sample_frames in pixel frames; CogVideoX's VAE compresses time 4x.
DIFFUSERS_TEMPORAL_COMPRESSION = 4
SAT_PREFIX = "model.diffusion_model."

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- configs


def config_from_diffusers(config: Mapping, **overrides) -> DiTConfig:
    """DiTConfig equivalent to a diffusers CogVideoXTransformer3DModel config (dict or FrozenDict)."""
    c = dict(config)
    if c.get("ofs_embed_dim"):
        raise ValueError("ofs_embed_dim (CogVideoX 1.5 image-to-video) is not supported")
    for key, expected in (("activation_fn", "gelu-approximate"), ("timestep_activation_fn", "silu")):
        if c.get(key, expected) != expected:
            raise ValueError(f"diffusers config {key}={c[key]!r} is not supported (only {expected!r})")
    rope = c.get("use_rotary_positional_embeddings", False)
    learned = c.get("use_learned_positional_embeddings", False)
    patch_size_t = c.get("patch_size_t")
    tcr = c.get("temporal_compression_ratio", DIFFUSERS_TEMPORAL_COMPRESSION)
    in_channels = c.get("in_channels", 16)
    out_channels = c.get("out_channels", 16)
    fields = dict(
        num_layers=c.get("num_layers", 30),
        num_attention_heads=c.get("num_attention_heads", 30),
        attention_head_dim=c.get("attention_head_dim", 64),
        in_channels=in_channels,
        out_channels=None if out_channels in (None, in_channels) else out_channels,  # None: same as in
        text_embed_dim=c.get("text_embed_dim", 4096),
        max_text_seq_length=c.get("max_text_seq_length", 226),
        time_embed_dim=c.get("time_embed_dim", 512),
        flip_sin_to_cos=c.get("flip_sin_to_cos", True),
        freq_shift=c.get("freq_shift", 0),
        patch_size=c.get("patch_size", 2),
        patch_size_t=patch_size_t,
        # diffusers' 1.5 patch projection is a Linear that always has a bias, whatever patch_bias says.
        patch_bias=True if patch_size_t is not None else c.get("patch_bias", True),
        positional_embedding="learned" if learned else ("rope" if rope else "sincos"),
        sample_height=c.get("sample_height", 60),
        sample_width=c.get("sample_width", 90),
        sample_frames=(c.get("sample_frames", 49) - 1) // tcr + 1,
        spatial_interpolation_scale=c.get("spatial_interpolation_scale", 1.875),
        temporal_interpolation_scale=c.get("temporal_interpolation_scale", 1.0),
        attention_bias=c.get("attention_bias", True),
        norm_eps=c.get("norm_eps", 1e-5),
        norm_elementwise_affine=c.get("norm_elementwise_affine", True),
        dropout=c.get("dropout", 0.0),
    )
    fields.update(overrides)
    return DiTConfig(**fields).validate()


def diffusers_config(config: DiTConfig) -> dict:
    """The diffusers CogVideoXTransformer3DModel config (constructor kwargs) equivalent to ours."""
    if not config.qk_norm:
        raise ValueError("DiTConfig.qk_norm=False has no diffusers equivalent")
    if config.rope_theta != 10000.0:
        raise ValueError("DiTConfig.rope_theta must be 10000 for diffusers")
    return dict(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=config.in_channels,
        out_channels=config.output_channels,
        flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift,
        time_embed_dim=config.time_embed_dim,
        ofs_embed_dim=None,
        text_embed_dim=config.text_embed_dim,
        num_layers=config.num_layers,
        dropout=config.dropout,
        attention_bias=config.attention_bias,
        sample_width=config.sample_width,
        sample_height=config.sample_height,
        sample_frames=(config.sample_frames - 1) * DIFFUSERS_TEMPORAL_COMPRESSION + 1,
        patch_size=config.patch_size,
        patch_size_t=config.patch_size_t,
        temporal_compression_ratio=DIFFUSERS_TEMPORAL_COMPRESSION,
        max_text_seq_length=config.max_text_seq_length,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=config.norm_elementwise_affine,
        norm_eps=config.norm_eps,
        spatial_interpolation_scale=config.spatial_interpolation_scale,
        temporal_interpolation_scale=config.temporal_interpolation_scale,
        use_rotary_positional_embeddings=config.positional_embedding in ("rope", "learned"),
        use_learned_positional_embeddings=config.positional_embedding == "learned",
        patch_bias=config.patch_bias,
    )


# ------------------------------------------------------------------------------------------ state dicts


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    out = {k: v for k, v in state_dict.items() if k != "patch_embed.pos_embedding" or config.positional_embedding == "learned"}
    weight = out["patch_embed.proj.weight"]
    out["patch_embed.proj.weight"] = weight.reshape(weight.shape[0], -1)
    return out


def state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    out = dict(state_dict)
    weight = out["patch_embed.proj.weight"]
    if config.patch_size_t is None:
        p = config.patch_size
        out["patch_embed.proj.weight"] = weight.reshape(weight.shape[0], config.in_channels, p, p)
    elif "patch_embed.proj.bias" not in out:
        out["patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])  # diffusers' Linear always has one
    return out


def _load_diffusers_folder(folder: Path) -> tuple[dict, StateDict]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(f"{folder}/config.json describes a {config['_class_name']}, not a {DIFFUSERS_CLASS}")
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return config, load_file(folder / DIFFUSERS_WEIGHTS)
    if (folder / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        state_dict: StateDict = {}
        for shard in shards:
            state_dict.update(load_file(folder / shard))
        return config, state_dict
    raise FileNotFoundError(f"{folder} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")


def from_diffusers(source, config: DiTConfig | None = None, **overrides) -> CogVideoXTransformer:
    """Our transformer with the weights of a diffusers CogVideoXTransformer3DModel.

    source: the diffusers model itself, a folder written by its save_pretrained (config.json + safetensors;
    for a full pipeline pass its ``transformer`` subfolder), or a state dict (then ``config`` is required).
    overrides: DiTConfig fields that do not change the weights (attention_backend, gradient_checkpointing...).
    """
    if isinstance(source, nn.Module):
        diff_config, state_dict = dict(source.config), source.state_dict()
    elif isinstance(source, (str, Path)):
        diff_config, state_dict = _load_diffusers_folder(Path(source))
    elif isinstance(source, Mapping):
        if config is None:
            raise ValueError("from_diffusers(state_dict) needs config=DiTConfig(...)")
        diff_config, state_dict = None, dict(source)
    else:
        raise TypeError(f"from_diffusers expects a model, a folder or a state dict, got {type(source).__name__}")
    if config is None:
        config = config_from_diffusers(diff_config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    model = CogVideoXTransformer(config)
    model.load_state_dict(state_dict_from_diffusers(state_dict, config), strict=True)
    return model


def export_diffusers(model: CogVideoXTransformer, folder: str | Path) -> Path:
    """Writes config.json and diffusion_pytorch_model.safetensors that
    ``CogVideoXTransformer3DModel.from_pretrained(folder)`` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": _diffusers_version(), **diffusers_config(model.config)}
    state_dict = state_dict_to_diffusers(model.state_dict(), model.config)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, folder / DIFFUSERS_WEIGHTS)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is not needed to write the folder
        return "0.30.0"


# ------------------------------------------------------------------------------------------------- SAT

# SAT (CogVideoX's SwissArmyTransformer training code) key -> ours, for keys that are a plain rename.
# Per-layer keys use {i}.
_SAT_RENAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "mixins.patch_embed.proj": "patch_embed.proj",
    "mixins.patch_embed.text_proj": "patch_embed.text_proj",
    "transformer.final_layernorm": "norm_final",
    "mixins.final_layer.norm_final": "norm_out.norm",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation.1": "norm_out.linear",
    "transformer.layers.{i}.input_layernorm": "transformer_blocks.{i}.norm1.norm",
    "transformer.layers.{i}.post_attention_layernorm": "transformer_blocks.{i}.norm2.norm",
    "transformer.layers.{i}.attention.dense": "transformer_blocks.{i}.attn1.to_out.0",
    "transformer.layers.{i}.mlp.dense_h_to_4h": "transformer_blocks.{i}.ff.net.0.proj",
    "transformer.layers.{i}.mlp.dense_4h_to_h": "transformer_blocks.{i}.ff.net.2",
    "mixins.adaln_layer.query_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_q",
    "mixins.adaln_layer.key_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_k",
}
_SAT_QKV = "transformer.layers.{i}.attention.query_key_value"
_SAT_ADALN = "mixins.adaln_layer.adaLN_modulations.{i}.1"
_SAT_POS_EMBEDDING = "mixins.pos_embed.pos_embedding"
# Buffers SAT saves that are recomputed here (rotary tables) or unused (token embeddings of its base LM).
_SAT_IGNORED = re.compile(r"(freqs_sin|freqs_cos|position_embeddings|word_embeddings|embed_tokens)")
# SAT's per-layer modulation is 12 chunks: video shift/scale/gate for attention, then for the MLP, then the
# same six for text. Ours (diffusers') is, per norm, video shift/scale/gate then text shift/scale/gate.
_NORM1_CHUNKS, _NORM2_CHUNKS = (0, 1, 2, 6, 7, 8), (3, 4, 5, 9, 10, 11)


def _sat_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + r"\.(weight|bias)$")


_SAT_RENAME_PATTERNS = [(_sat_pattern(src), dst) for src, dst in _SAT_RENAMES.items()]


def sat_state_dict(checkpoint: Mapping) -> StateDict:
    """The SAT diffusion-model weights inside a loaded checkpoint, without the ``model.diffusion_model.``
    prefix: accepts ``mp_rank_00_model_states.pt`` contents ({"module": ...}), {"state_dict": ...} or the
    flat dict; keys of other SAT models (VAE, text encoder) are left out."""
    for key in ("module", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    return {k[len(SAT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(SAT_PREFIX)}


def state_dict_from_sat(sat: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """Our state dict from SAT keys (prefix already removed, see ``sat_state_dict``)."""
    out: StateDict = {}
    unknown = []
    qkv, adaln = _sat_pattern(_SAT_QKV), _sat_pattern(_SAT_ADALN)
    for key, value in sat.items():
        if _SAT_IGNORED.search(key):
            continue
        if key == _SAT_POS_EMBEDDING:
            # 2B saves its fixed sin-cos table too; only the learned table of image-to-video models is a weight.
            if config.positional_embedding == "learned":
                out["patch_embed.pos_embedding"] = value
            continue
        if m := qkv.match(key):
            layer, kind = m.groups()
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"transformer_blocks.{layer}.attn1.{name}.{kind}"] = part
            continue
        if m := adaln.match(key):
            layer, kind = m.groups()
            chunks = value.chunk(12, dim=0)
            out[f"transformer_blocks.{layer}.norm1.linear.{kind}"] = torch.cat([chunks[c] for c in _NORM1_CHUNKS])
            out[f"transformer_blocks.{layer}.norm2.linear.{kind}"] = torch.cat([chunks[c] for c in _NORM2_CHUNKS])
            continue
        for pattern, dst in _SAT_RENAME_PATTERNS:
            if m := pattern.match(key):
                *layer, kind = m.groups()
                out[dst.format(i=layer[0] if layer else "") + "." + kind] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"SAT checkpoint has keys with no mapping: {sorted(unknown)[:10]}")
    weight = out["patch_embed.proj.weight"]
    out["patch_embed.proj.weight"] = weight.reshape(weight.shape[0], -1)  # SAT 1.0 saves a Conv2d kernel
    return out


def state_dict_to_sat(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """Inverse of ``state_dict_from_sat`` (SAT keys without prefix; the patch kernel in Conv2d form for 1.0)."""
    inverse = [(re.compile("^" + re.escape(dst).replace(re.escape("{i}"), r"(\d+)") + r"\.(weight|bias)$"), src)
               for src, dst in _SAT_RENAMES.items()]
    out: StateDict = {}
    layers = config.num_layers
    for key, value in state_dict.items():
        if key == "patch_embed.pos_embedding":
            out[_SAT_POS_EMBEDDING] = value
            continue
        if re.search(r"\.attn1\.to_[qkv]\.|\.norm[12]\.linear\.", key):
            continue  # fused below
        for pattern, src in inverse:
            if m := pattern.match(key):
                *layer, kind = m.groups()
                out[src.format(i=layer[0] if layer else "") + "." + kind] = value
                break
        else:
            raise ValueError(f"no SAT name for {key}")
    for i in range(layers):
        block = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            parts = [state_dict.get(f"{block}.attn1.to_{n}.{kind}") for n in "qkv"]
            if parts[0] is not None:
                out[_SAT_QKV.format(i=i) + "." + kind] = torch.cat(parts)
            norm1 = state_dict[f"{block}.norm1.linear.{kind}"].chunk(6, dim=0)
            norm2 = state_dict[f"{block}.norm2.linear.{kind}"].chunk(6, dim=0)
            chunks = [None] * 12
            for src, dst in enumerate(_NORM1_CHUNKS):
                chunks[dst] = norm1[src]
            for src, dst in enumerate(_NORM2_CHUNKS):
                chunks[dst] = norm2[src]
            out[_SAT_ADALN.format(i=i) + "." + kind] = torch.cat(chunks)
    if config.patch_size_t is None:
        w = out["mixins.patch_embed.proj.weight"]
        out["mixins.patch_embed.proj.weight"] = w.reshape(w.shape[0], config.in_channels, config.patch_size, config.patch_size)
    return out


def from_sat(source, config: DiTConfig) -> CogVideoXTransformer:
    """Our transformer from a CogVideoX SAT checkpoint: a path to ``mp_rank_00_model_states.pt`` (or a
    folder holding it) or its loaded contents. SAT checkpoints carry no model config: pass the matching
    ``config`` (e.g. ``DiTConfig.preset("cogvideox-5b")``)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "mp_rank_00_model_states.pt"
        source = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = CogVideoXTransformer(config)
    model.load_state_dict(state_dict_from_sat(sat_state_dict(source), config), strict=True)
    return model


def export_sat(model: CogVideoXTransformer) -> dict:
    """{"module": SAT state dict with the ``model.diffusion_model.`` prefix}, the layout of
    ``mp_rank_00_model_states.pt``."""
    sat = state_dict_to_sat(model.state_dict(), model.config)
    return {"module": {SAT_PREFIX + k: v for k, v in sat.items()}}


def diffusers_rotary_emb(config: DiTConfig, frames: int, height: int, width: int,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``image_rotary_emb`` that diffusers' CogVideoX pipeline passes to its transformer for latents of
    frames x height x width (None for sin-cos models): what a diffusers model needs to run on the inputs
    ours takes (benchmarks, parity tests). Uses diffusers' own functions."""
    if config.positional_embedding == "sincos":
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = config.patch_size
    grid = (height // p, width // p)
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if config.patch_size_t is None:
        crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid, frames, device=device)
    return get_3d_rotary_pos_embed(
        config.attention_head_dim, None, grid, (frames + config.patch_size_t - 1) // config.patch_size_t,
        grid_type="slice", max_size=(base_h, base_w), device=device,
    )
