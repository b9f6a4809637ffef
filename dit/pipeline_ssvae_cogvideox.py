"""Text-to-video with our DiT on SSVAE latents as a diffusers pipeline: ``SSVAECogVideoXPipeline``.

This file imports torch, diffusers and transformers only, on purpose: ``dit.export_pipeline`` copies it into the
pipeline folders it writes, and ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs it where
none of our packages is installed. It reproduces ``dit.runtime.sample_prompts`` (the sampler our trainings evaluate
with) step for step; ``tests/test_export_pipeline.py`` holds the two equal.

Why not diffusers' ``CogVideoXPipeline``, whose transformer (``CogVideoXTransformer3DModel``), scheduler
(``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``) and LoRA loading this pipeline does use unchanged:

- the SSVAE's 48 latent channels are normalised per channel, ``(z - latents_mean) / latents_std`` with the statistics
  in the VAE's config (as ``AutoencoderKLWan`` keeps them); ``CogVideoXPipeline`` divides by one ``scaling_factor``
  and reads the VAE's compression from ``block_out_channels``, which the SSVAE does not have;
- the unconditional branch of guidance is all-zero text states, which is what caption dropout trained (CogVideoX's
  SAT recipe); ``CogVideoXPipeline`` encodes an empty negative prompt instead;
- a DiT trained with masked text padding (the CPU-scale MiniLM runs) must see the same key mask: it reaches
  diffusers' CogVideoX attention processor as ``attention_kwargs["attention_mask"]``;
- the text encoder can be any transformers encoder (T5 at full scale, MiniLM at CPU scale), run with or without its
  padding mask as the training ran it;
- a DiT trained on transformed latents (``first_stage.latent_transform``: the channel whitening the main job's DiT
  sees, or the study's checkerboard) samples in that space: ``latent_transform`` in this pipeline's config holds the
  transform's inverse (for whitening, the mean and the 48x48 inverse matrix, as JSON), undone before de-normalising.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from diffusers import CogVideoXDPMScheduler, DiffusionPipeline
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
from diffusers.video_processor import VideoProcessor

OUTPUT_TYPES = ("pt", "np", "pil", "latent")
TRANSFORM_KINDS = ("whiten", "checkerboard")


def check_latent_transform(transform: Optional[dict], channels: int) -> None:
    """Raise ValueError naming what is wrong with a ``latent_transform`` config entry (None: no transform)."""
    if transform is None:
        return
    kind = transform.get("kind") if isinstance(transform, dict) else None
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"latent_transform.kind: must be one of {TRANSFORM_KINDS}, got {kind!r}")
    if kind == "checkerboard":
        if not isinstance(transform.get("cell"), int) or transform["cell"] < 1:
            raise ValueError(f"latent_transform.cell: a checkerboard needs a cell of >= 1 latent positions, got "
                             f"{transform.get('cell')!r}")
        return
    mean, matrix = transform.get("mean"), transform.get("inverse_matrix")
    if not isinstance(mean, list) or len(mean) != channels:
        raise ValueError(f"latent_transform.mean: needs {channels} values (one per latent channel)")
    if not isinstance(matrix, list) or len(matrix) != channels or any(len(row) != channels for row in matrix):
        raise ValueError(f"latent_transform.inverse_matrix: needs {channels}x{channels} values")


def dynamic_guidance(guidance: float, step_index: int, num_steps: int) -> float:
    """CogVideoX SAT's ramped guidance: 1 + g * (1 - cos(pi * (i / n)^5)) / 2 (``dit.samplers``' own formula)."""
    return 1.0 + guidance * (1.0 - math.cos(math.pi * (step_index / num_steps) ** 5.0)) / 2.0


class SSVAECogVideoXPipeline(DiffusionPipeline, CogVideoXLoraLoaderMixin):
    """Prompts -> videos: text encoder, ``CogVideoXTransformer3DModel`` with classifier-free guidance through a
    CogVideoX scheduler, then the SSVAE decoder on de-normalised latents.

    ``max_text_length``, ``text_encoder_mask`` (run the text encoder with its padding mask) and ``text_mask`` (the DiT
    attends only to real text tokens) are how the DiT was trained; ``num_frames``, ``height``, ``width`` and ``fps``
    are the training's sample size, used when a call does not give one.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, max_text_length: int = 226,
                 text_encoder_mask: bool = False, text_mask: bool = False, num_frames: int = 49, height: int = 480,
                 width: int = 720, fps: float = 8.0, latent_transform: Optional[dict] = None):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
        check_latent_transform(latent_transform, transformer.config.in_channels)
        self.register_to_config(max_text_length=max_text_length, text_encoder_mask=text_encoder_mask,
                                text_mask=text_mask, num_frames=num_frames, height=height, width=width, fps=fps,
                                latent_transform=latent_transform)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.spatial_compression_ratio)

    # ---- text ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, D) float32 and padding mask (B, L) bool, padded to ``max_text_length``."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.config.max_text_length,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask if self.config.text_encoder_mask else None)
        return out.last_hidden_state.float(), mask.bool()

    # ---- latents ------------------------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(latent frames, channels, h, w), the transformer's layout, for a video of the given size."""
        tc, sc = self.vae.temporal_compression_ratio, self.vae.spatial_compression_ratio
        for name, value, step in (("height", height, sc), ("width", width, sc)):
            if value <= 0 or value % step:
                raise ValueError(f"{name} must be a positive multiple of {step} (the VAE's compression), got {value}")
        if num_frames < 1 or (num_frames - 1) % tc:
            raise ValueError(f"num_frames must be 1 + {tc}k (the VAE's causal time compression), got {num_frames}")
        return (num_frames - 1) // tc + 1, self.transformer.config.in_channels, height // sc, width // sc

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer latents (B, F, C, h, w), normalised per channel -> the VAE's raw latents (B, C, F, h, w)."""
        z = self._untransform(latents.permute(0, 2, 1, 3, 4))
        mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        if mean is None or std is None:
            raise ValueError("the VAE's config has no latents_mean / latents_std: the DiT was trained on normalised "
                             "latents, so the VAE folder must carry their statistics (vae.convert_diffusers writes them)")
        shape = (1, -1, 1, 1, 1)
        return z * torch.tensor(std, device=z.device).view(shape) + torch.tensor(mean, device=z.device).view(shape)

    def _untransform(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of the latent transform the DiT was trained behind (``vae.latent_transform``), on (B, C, F, h,
        w); the identity without one."""
        transform = self.config.latent_transform
        if transform is None:
            return z
        if transform["kind"] == "checkerboard":  # its own inverse
            rows = torch.arange(z.shape[-2], device=z.device) // transform["cell"]
            cols = torch.arange(z.shape[-1], device=z.device) // transform["cell"]
            return z * (1 - 2 * ((rows[:, None] + cols[None, :]) % 2)).to(z.dtype)
        matrix = torch.tensor(transform["inverse_matrix"], dtype=torch.float32, device=z.device).to(z.dtype)
        mean = torch.tensor(transform["mean"], dtype=torch.float32, device=z.device).to(z.dtype)
        return torch.einsum("dc,bcfhw->bdfhw", matrix, z) + mean.view(1, -1, 1, 1, 1)

    def _rotary_embedding(self, frames: int, h: int, w: int, device: torch.device):
        """The 3D RoPE of diffusers' CogVideoX pipelines for a latent grid (None for sin-cos transformers)."""
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid = (h // p, w // p)
        base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
            return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, grid, frames, device=device)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, grid, (frames + p_t - 1) // p_t,
                                       grid_type="slice", max_size=(base_h, base_w), device=device)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def _denoise(self, latents: torch.Tensor, states: torch.Tensor, mask: Optional[torch.Tensor],
                 neg_states: torch.Tensor, neg_mask: Optional[torch.Tensor], steps: int, guidance: float,
                 dynamic_cfg: bool, generator, progress: bool) -> torch.Tensor:
        """The loop of ``dit.samplers.sample``: float32 latents, guidance v_u + g (v_c - v_u), one scheduler step."""
        device, dtype = latents.device, self.transformer.dtype
        use_cfg = dynamic_cfg or guidance != 1.0
        if use_cfg:
            states = torch.cat([neg_states, states])
            mask = None if mask is None else torch.cat([neg_mask, mask])
        attention_kwargs = None
        if mask is not None:  # keys: the real text tokens, then every video token
            video = mask.new_ones(mask.shape[0], self._num_video_tokens(latents))
            attention_kwargs = {"attention_mask": torch.cat([mask, video], dim=1)[:, None, :]}
        rotary = self._rotary_embedding(latents.shape[1], latents.shape[3], latents.shape[4], device)
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = latents.float() * self.scheduler.init_noise_sigma
        old_x0 = None  # DPM-Solver++(2M) history
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            x = torch.cat([latents, latents]) if use_cfg else latents
            v = self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=states.to(dtype),
                                 timestep=t.expand(x.shape[0]), image_rotary_emb=rotary,
                                 attention_kwargs=attention_kwargs, return_dict=False)[0].float()
            if use_cfg:
                scale = dynamic_guidance(guidance, i, steps) if dynamic_cfg else guidance
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + scale * (v_cond - v_uncond)
            if isinstance(self.scheduler, CogVideoXDPMScheduler):
                latents, old_x0 = self.scheduler.step(v, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                                      generator=generator, return_dict=False)
            else:
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        return latents.float()

    def _num_video_tokens(self, latents: torch.Tensor) -> int:
        cfg = self.transformer.config
        frames = latents.shape[1] if cfg.patch_size_t is None else (latents.shape[1] + cfg.patch_size_t - 1) // cfg.patch_size_t
        return frames * (latents.shape[3] // cfg.patch_size) * (latents.shape[4] // cfg.patch_size)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Union[str, list[str], None] = None,
                 num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None, seed: Optional[int] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "np", return_dict: bool = True,
                 batch_size: int = 16, callback_on_step_end: Optional[Callable] = None):
        """Videos for ``prompt`` (one or a list).

        Noise: prompt ``i`` draws its own from ``generator[i]`` (a list, one per prompt), or from a generator seeded
        ``seed + i`` (our sampling tools' convention, so a prompt's video does not depend on the others), or from
        one shared ``generator``; ``latents`` (B, F, C, h, w) replaces it. The deterministic DDIM scheduler runs up
        to ``batch_size`` prompts together; the stochastic DPM++ one draws from each prompt's generator at every
        step, one prompt at a time. Without ``negative_prompt`` the unconditional branch is zero text states.
        ``output_type``: "np" (B, T, H, W, 3) or "pt" (B, T, 3, H, W) in [0, 1], "pil", or "latent" (the
        normalised latents, in the latent transform's space when there is one).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        if callback_on_step_end is not None:
            raise ValueError("callback_on_step_end is not supported by SSVAECogVideoXPipeline")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        n = len(prompts)
        shape = self.latent_shape(num_frames or self.config.num_frames, height or self.config.height,
                                  width or self.config.width)
        device = self._execution_device
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} prompts: give one per prompt")
        if generator is None and seed is not None:
            generator = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]
        if latents is None:
            if isinstance(generator, list):
                latents = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
            else:
                latents = torch.randn((n, *shape), generator=generator,
                                      device=generator.device if generator is not None else device)
        elif tuple(latents.shape) != (n, *shape):
            raise ValueError(f"latents must be {(n, *shape)} (prompts, latent frames, channels, h, w), got "
                             f"{tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)

        states, mask = self.encode_prompt(prompts, device)
        if negative_prompt is None:
            neg_states, neg_mask = torch.zeros_like(states), torch.ones_like(mask)
        else:
            negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != n:
                raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
            neg_states, neg_mask = self.encode_prompt(negatives, device)
        if not self.config.text_mask:
            mask = neg_mask = None

        stochastic = isinstance(self.scheduler, CogVideoXDPMScheduler)
        per_call = 1 if stochastic else max(1, batch_size)
        outputs = []
        for start in range(0, n, per_call):
            rows = slice(start, min(start + per_call, n))
            group_generator = generator[start] if isinstance(generator, list) else generator
            outputs.append(self._denoise(
                latents[rows], states[rows], None if mask is None else mask[rows], neg_states[rows],
                None if neg_mask is None else neg_mask[rows], num_inference_steps, guidance_scale, use_dynamic_cfg,
                group_generator, progress=n <= per_call))
        latents = torch.cat(outputs)

        if output_type == "latent":
            video = latents
        else:
            z = self._denormalize(latents).to(self.vae.dtype)
            video = torch.cat([self.vae.decode(part).sample.float().clamp(-1, 1) for part in z.split(per_call)])
            video = self.video_processor.postprocess_video(video=video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return CogVideoXPipelineOutput(frames=video)
