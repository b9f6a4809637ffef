"""UnifiedReward scores of generated videos: a Qwen-VL reward model (Qwen2.5-VL or Qwen3-VL, whichever its folder's
config names) asked to rate frames against the caption.

UnifiedReward (Wang et al., arXiv 2503.05236; https://github.com/CodeGoat24/UnifiedReward) fine-tunes Qwen2.5-VL to
answer a fixed rating prompt. Two published prompts are built in (the model must be asked in the format it was trained
on, so their wording is kept):

- ``pointwise`` (default; UnifiedReward-qwen 1.x, ``inference_qwen/video_generation/
  qwen_point_score_video_generation.py``): five dimensions rated 1-4, then ``Final Score:`` 1-10. The score is the final
  score. Answers without ``Final Score:`` are still scored when they are a bare number (``7``, ``Score: 7/10``) or list
  all five dimensions (then 1 + 3 * (mean - 1), mapping the 1-4 mean onto 1-10); ``source`` says which.
- ``alignment_physics_style`` (UnifiedReward 2.0, ``inference_qwen/UnifiedReward-2.0-inference/
  point_score_ACS_video_generation.py``): ``Alignment/Physics/Style Score (1-5)``; the score is their mean.

A custom template is any text holding ``{prompt}`` (the caption goes there) plus an ``answer_format`` naming one of the
parsers above. An answer that its parser cannot read (or that is out of the stated range) is never scored: it is
counted in ``num_unparseable`` and listed in ``unparseable``, and means are over the parsed answers only.

Frames are sampled evenly (frame ``i * T // n``, as the published scripts do) and given to the model as images, like
UnifiedReward 2.0's own evaluation. The image path needs no torchvision (which the Qwen2.5-VL *video* processor
requires): the tokenizer's chat template, the Qwen2-VL PIL image processor and the image-token expansion are done
here. Decoding is greedy. The text generation is one callable (``Generator``), so scoring and parsing can be used
with any backend (a vLLM server, a test double).

    python -m tools.unified_reward --model /models/UnifiedReward-qwen-7b --videos samples/ --meta data/default \
        --num-frames 8 --batch-size 2 --out unified_reward.json
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from infra.config import check, join_key
from infra.dtypes import DTYPES as TORCH_DTYPES

log = logging.getLogger(__name__)

POINTWISE_VIDEO = (
    "Suppose you are an expert in judging and evaluating the quality of AI-generated videos, please watch the frames "
    "of a given video and see the text prompt for generating the video.\n"
    "Then give scores from 5 different dimensions:\n"
    "(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color\n"
    "(2) temporal consistency, the consistency of objects or humans in video\n"
    "(3) dynamic degree, the degree of dynamic changes\n"
    "(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n\n"
    "For each dimension, output a number from [1,2,3,4], \n"
    "in which '1' means 'Bad', '2' means 'Average', '3' means 'Good', \n"
    "'4' means 'Real' or 'Perfect' (the video is like a real video)\n"
    "Finally, based on above 5 dimensions, assign a score from 1 to 10 after 'Final Score:'\n"
    "Here is an output example:\n"
    "visual quality: 4\ntemporal consistency: 4\ndynamic degree: 3\ntext-to-video alignment: 1\n"
    "factual consistency: 2\nFinal Score: 6\n\n"
    "**Note: In the example above, scores are placeholders meant only to demonstrate the format. Your actual "
    "evaluation should be based on the quality of the given video.**\n"
    "Your task is provided as follows: Text Prompt: [{prompt}]"
)
ALIGNMENT_PHYSICS_STYLE = (
    "You are presented with a generated video and its associated text caption. Your task is to analyze the video "
    "across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the video along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the video matches the caption in terms of content.\n"
    "- Physics Score: How well the gravity, movements, collisions, and interactions make physical sense.\n"
    "- Style Score: How visually appealing the video looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\nPhysics Score (1-5): Y\nStyle Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
TEMPLATES = {"pointwise": POINTWISE_VIDEO, "alignment_physics_style": ALIGNMENT_PHYSICS_STYLE}

_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
POINTWISE_DIMENSIONS = ("visual quality", "temporal consistency", "dynamic degree", "text-to-video alignment",
                        "factual consistency")
APS_DIMENSIONS = ("alignment", "physics", "style")


@dataclass
class ParsedScore:
    score: float
    dimensions: dict[str, float]
    source: str  # which part of the answer gave the score


def _last_number_after(label: str, text: str) -> Optional[float]:
    """The number after the last ``label:`` in ``text`` (models sometimes echo the example first)."""
    found = re.findall(label + r"\s*[:：]\s*\**\s*" + _NUMBER, text, flags=re.IGNORECASE)
    return float(found[-1]) if found else None


def parse_pointwise(text: str) -> Optional[ParsedScore]:
    """Final score 1-10 of a ``pointwise`` answer, or None when it cannot be read."""
    dims = {}
    for name in POINTWISE_DIMENSIONS:
        value = _last_number_after(re.escape(name), text)
        if value is not None and 1 <= value <= 4:
            dims[name] = value
    final = _last_number_after(r"final\s*score", text)
    if final is not None:
        return ParsedScore(final, dims, "final") if 1 <= final <= 10 else None
    bare = re.fullmatch(r"\s*(?:(?:final\s*)?score\s*[:：]?\s*)?" + _NUMBER + r"\s*(?:/\s*10)?\s*\.?\s*", text,
                        flags=re.IGNORECASE)
    if bare:
        value = float(bare.group(1))
        return ParsedScore(value, dims, "bare") if 1 <= value <= 10 else None
    if len(dims) == len(POINTWISE_DIMENSIONS):
        return ParsedScore(1.0 + 3.0 * (float(np.mean(list(dims.values()))) - 1.0), dims, "dimensions")
    return None


def parse_alignment_physics_style(text: str) -> Optional[ParsedScore]:
    """Mean of the three 1-5 scores of an ``alignment_physics_style`` answer, or None unless all three are read."""
    dims = {}
    for name in APS_DIMENSIONS:
        value = _last_number_after(name + r"\s*score\s*(?:\(\s*1\s*-\s*5\s*\))?", text)
        if value is None or not 1 <= value <= 5:
            return None
        dims[name] = value
    return ParsedScore(float(np.mean(list(dims.values()))), dims, "dimensions")


PARSERS: dict[str, Callable[[str], Optional[ParsedScore]]] = {
    "pointwise": parse_pointwise, "alignment_physics_style": parse_alignment_physics_style,
}
SCALES = {"pointwise": (1.0, 10.0), "alignment_physics_style": (1.0, 5.0)}
DTYPES = tuple(TORCH_DTYPES)


@dataclass
class UnifiedRewardConfig:
    model_path: str = ""  # local folder of the reward model (weights, tokenizer, preprocessor config)
    template: str = "pointwise"  # a name in TEMPLATES, or custom text holding "{prompt}"
    answer_format: str = ""  # parser name; "" takes the built-in template's own
    num_frames: int = 8
    batch_size: int = 2
    max_new_tokens: int = 256
    max_pixels: int = 0  # per frame, for the image processor; 0 keeps the model folder's setting
    dtype: str = "bfloat16"

    def validate(self, prefix: str = "") -> None:
        """``prefix``: the section's key in a run config (the study's ``reward.unified``), "" standalone."""
        def key(name: str) -> str:
            return join_key(prefix, name)

        check(self.template in TEMPLATES or "{prompt}" in self.template, key("template"),
              f"must be one of {tuple(TEMPLATES)} or text holding '{{prompt}}', got {self.template[:60]!r}")
        check(self.template in TEMPLATES or bool(self.answer_format), key("answer_format"),
              "must name a parser for a custom template")
        check(not self.answer_format or self.answer_format in PARSERS, key("answer_format"),
              f"must be one of {tuple(PARSERS)}, got {self.answer_format!r}")
        for name in ("num_frames", "batch_size", "max_new_tokens"):
            check(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        check(self.max_pixels >= 0, key("max_pixels"), f"must be >= 0, got {self.max_pixels}")
        check(self.dtype in DTYPES, key("dtype"), f"must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def prompt_template(self) -> str:
        return TEMPLATES.get(self.template, self.template)

    @property
    def parser_name(self) -> str:
        return self.answer_format or self.template


def build_prompt(template: str, caption: str) -> str:
    # str.replace, not str.format: the published prompts hold other braces-free text, custom ones might not.
    return template.replace("{prompt}", caption)


def sample_frames(video, num_frames: int) -> list[np.ndarray]:
    """``num_frames`` evenly spaced uint8 frames (H, W, 3) of a video (fewer if it is shorter).

    ``video``: uint8 (T, H, W, 3), a (3, T, H, W) tensor in [-1, 1], or an mp4 path.
    """
    if isinstance(video, (str, Path)):
        from infra.data.decode import decode_all

        video = decode_all(Path(video).read_bytes())
    elif hasattr(video, "detach"):
        from infra.video_io import to_uint8_frames

        video = to_uint8_frames(video)
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (T, H, W, 3), a (3, T, H, W) tensor or a path, got "
                         f"{video.dtype} {video.shape}")
    total = video.shape[0]
    indices = sorted({i * total // num_frames for i in range(num_frames)})
    return [video[i] for i in indices]


# Model types whose image path this module drives (the Qwen2-VL image processor, <|image_pad|> slots).
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def reward_architecture(folder: Path) -> str:
    """The reward model's ``model_type`` from its config.json; an error naming it when it is not a Qwen-VL model."""
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{config}: cannot read the model_type of the reward model ({e!r})") from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{config}: model_type {model_type!r} is not a Qwen-VL reward model; supported: "
                         f"{SUPPORTED_MODEL_TYPES}")
    return model_type


# A generator answers one prompt per video, given that video's frames.
Generator = Callable[[list[list[np.ndarray]], list[str]], list[str]]


class QwenVLGenerator:
    """Greedy answers of a Qwen-VL model (2.5 or 3) to (frames, prompt) pairs, the frames given as images."""

    image_token = "<|image_pad|>"

    def __init__(self, model, tokenizer, image_processor, max_new_tokens: int = 256) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template")
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "bfloat16", device: str | None = None,
                        max_pixels: int = 0, max_new_tokens: int = 256) -> "QwenVLGenerator":
        """Load model, tokenizer and image processor from a local folder (never from a hub)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"reward model folder {folder} not found (only local folders are loaded)")
        architecture = reward_architecture(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(tokenizer, "chat_template", None):
            # Qwen2.5-VL folders may keep the template beside the processor instead of in the tokenizer config.
            for name in ("chat_template.jinja", "chat_template.json"):
                if (folder / name).is_file():
                    text = (folder / name).read_text()
                    tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith("json") else text
                    break
        extra = {"max_pixels": max_pixels} if max_pixels else {}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True, **extra)
        # The class comes from the folder's config (Qwen2.5-VL for UnifiedReward 1.x and 2.0-qwen, Qwen3-VL for the
        # 2.0-qwen3vl models, 2B and up): the Auto class maps its model_type.
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype), local_files_only=True)
        log.info("reward model %s: %s", folder, architecture)
        if device:
            model = model.to(device)
        return cls(model, tokenizer, image_processor, max_new_tokens)

    def _text(self, prompt: str, count: int, tokens_per_image: list[int]) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(self.image_token)
        if len(parts) != count + 1:
            raise ValueError(f"the chat template produced {len(parts) - 1} image slots for {count} frames")
        # Each image slot becomes as many tokens as the vision tower emits for that image (after merging).
        return parts[0] + "".join(self.image_token * n + part for n, part in zip(tokens_per_image, parts[1:]))

    def __call__(self, frames: list[list[np.ndarray]], prompts: list[str]) -> list[str]:
        import torch

        images = [frame for video in frames for frame in video]
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        tokens = [int(n) // merge for n in vision["image_grid_thw"].prod(dim=-1)]
        texts, start = [], 0
        for video, prompt in zip(frames, prompts, strict=True):
            texts.append(self._text(prompt, len(video), tokens[start:start + len(video)]))
            start += len(video)
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        inputs["pixel_values"] = vision["pixel_values"].to(device, self.model.dtype)
        inputs["image_grid_thw"] = vision["image_grid_thw"].to(device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_videos(videos: list, captions: list[str], generate: Generator, cfg: UnifiedRewardConfig,
                 keys: list[str] | None = None, show_progress: bool = True) -> dict:
    """Ask ``generate`` to rate each video against its caption; per-video answers and scores, means, failures.

    Returns ``{"template", "answer_format", "scale", "count", "num_scored", "num_unparseable", "unparseable",
    "mean_score", "mean_dimensions", "per_video"}``; unparseable answers have ``score`` None and are left out of
    every mean.
    """
    from tqdm import tqdm

    cfg.validate()
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    keys = keys or [str(i) for i in range(len(videos))]
    parse = PARSERS[cfg.parser_name]
    per_video = []
    with tqdm(total=len(videos), desc="unified reward", unit="video", disable=not show_progress) as bar:
        for batch in _batches(list(range(len(videos))), cfg.batch_size):
            frames = [sample_frames(videos[i], cfg.num_frames) for i in batch]
            answers = generate(frames, [build_prompt(cfg.prompt_template, captions[i]) for i in batch])
            if len(answers) != len(batch):
                raise ValueError(f"the generator returned {len(answers)} answers for {len(batch)} videos")
            for i, answer in zip(batch, answers):
                parsed = parse(answer)
                per_video.append({
                    "key": keys[i], "caption": captions[i], "answer": answer, "parsed": parsed is not None,
                    "score": parsed.score if parsed else None,
                    "dimensions": parsed.dimensions if parsed else {},
                    "source": parsed.source if parsed else None,
                })
            bar.update(len(batch))
    scored = [v for v in per_video if v["parsed"]]
    names = sorted({name for v in scored for name in v["dimensions"]})
    return {
        "template": cfg.template if cfg.template in TEMPLATES else "custom",
        "answer_format": cfg.parser_name,
        "scale": list(SCALES[cfg.parser_name]),
        "count": len(per_video),
        "num_scored": len(scored),
        "num_unparseable": len(per_video) - len(scored),
        "unparseable": [v["key"] for v in per_video if not v["parsed"]],
        "mean_score": float(np.mean([v["score"] for v in scored])) if scored else None,
        "mean_dimensions": {name: float(np.mean([v["dimensions"][name] for v in scored if name in v["dimensions"]]))
                            for name in names},
        "per_video": per_video,
    }


def _captions(meta: str | None, videos: list[Path]) -> dict[str, str]:
    """Captions by key from meta files (``caption`` field) or from ``<key>.txt`` beside each video."""
    out = {}
    if meta:
        path = Path(meta)
        for file in sorted(path.glob("*.meta.jsonl")) if path.is_dir() else [path]:
            for line in file.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if "caption" in record:
                        out[record["key"]] = record["caption"]
    for video in videos:
        txt = video.with_suffix(".txt")
        if video.stem not in out and txt.is_file():
            out[video.stem] = txt.read_text().strip()
    return out


def main(argv: list[str] | None = None, generate: Generator | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Score generated videos with a local UnifiedReward model.")
    parser.add_argument("--model", required=True,
                        help="local folder of the reward model (Qwen2.5-VL or Qwen3-VL, as its config says)")
    parser.add_argument("--videos", required=True, help="folder of <key>.mp4 files")
    parser.add_argument("--meta", help=".meta.jsonl file or folder with captions (default: <key>.txt files)")
    parser.add_argument("--template", default="pointwise", help=f"one of {tuple(TEMPLATES)} or a text file")
    parser.add_argument("--answer-format", default="", help=f"parser for a custom template: {tuple(PARSERS)}")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-pixels", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", help="JSON output path (default: print)")
    args = parser.parse_args(argv)
    template = args.template if args.template in TEMPLATES else Path(args.template).read_text()
    cfg = UnifiedRewardConfig(args.model, template, args.answer_format, args.num_frames, args.batch_size,
                              args.max_new_tokens, args.max_pixels, args.dtype)
    cfg.validate()
    paths = sorted(Path(args.videos).glob("*.mp4"))
    captions = _captions(args.meta, paths)
    missing = [p.stem for p in paths if p.stem not in captions]
    paths = [p for p in paths if p.stem in captions]
    if not paths:
        raise ValueError(f"no video in {args.videos} has a caption")
    if generate is None:
        generate = QwenVLGenerator.from_pretrained(cfg.model_path, cfg.dtype, args.device, cfg.max_pixels,
                                                   cfg.max_new_tokens)
    result = score_videos(paths, [captions[p.stem] for p in paths], generate, cfg, [p.stem for p in paths])
    result["videos_without_caption"] = missing
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(json.dumps({k: result[k] for k in ("count", "num_scored", "num_unparseable", "mean_score")}))
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
