import json

import numpy as np
import pytest
import torch

from tools.unified_reward import (
    POINTWISE_VIDEO, QwenVLGenerator, UnifiedRewardConfig, build_prompt, main, parse_alignment_physics_style,
    parse_pointwise, sample_frames, score_videos,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# The Qwen2.5-VL chat layout, reduced to what a user turn with images and text needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + Qwen's special tokens) built offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer, core.decoder = ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_generator(max_new_tokens=6):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_tokenizer()
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(SPECIALS)))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # 56x56 frames: a 4x4 patch grid, 4 tokens per image after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return QwenVLGenerator(model, tokenizer, image_processor, max_new_tokens=max_new_tokens)


def videos(n=3, t=9, size=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ parsing
def test_pointwise_parser_on_realistic_answers():
    answer = ("visual quality: 3\ntemporal consistency: 4\ndynamic degree: 2\ntext-to-video alignment: 3\n"
              "factual consistency: 3\nFinal Score: 7")
    parsed = parse_pointwise(answer)
    assert parsed.score == 7 and parsed.source == "final"
    assert parsed.dimensions == {"visual quality": 3, "temporal consistency": 4, "dynamic degree": 2,
                                 "text-to-video alignment": 3, "factual consistency": 3}
    assert parse_pointwise("**Final Score:** 8.5").score == 8.5
    # An echoed example before the real answer: the last final score counts.
    assert parse_pointwise("e.g. Final Score: 6 ... my rating\nFinal score: 4").score == 4
    # Without "Final Score:": a bare number, or all five dimensions (mean 3 on 1-4 -> 7 on 1-10).
    assert parse_pointwise("7").score == 7 and parse_pointwise(" Score: 9/10.").source == "bare"
    dims_only = parse_pointwise(answer.rsplit("\n", 1)[0])
    assert dims_only.source == "dimensions" and dims_only.score == pytest.approx(1 + 3 * (15 / 5 - 1))


@pytest.mark.parametrize("garbage", [
    "", "I cannot evaluate this video.", "\u0120s777777", "Final Score: 85", "visual quality: 3\nFinal Score:",
    "visual quality: 3\ndynamic degree: 2",  # partial dimensions, no final score
    "The video shows 2 circles and 3 squares",
])
def test_pointwise_parser_refuses_garbage(garbage):
    assert parse_pointwise(garbage) is None


def test_alignment_physics_style_parser():
    answer = "Alignment Score (1-5): 2.4036\nPhysics Score (1-5): 3.0987\nStyle Score (1-5): 3.3889"
    parsed = parse_alignment_physics_style(answer)
    assert parsed.dimensions == {"alignment": 2.4036, "physics": 3.0987, "style": 3.3889}
    assert parsed.score == pytest.approx((2.4036 + 3.0987 + 3.3889) / 3)
    assert parse_alignment_physics_style("Alignment Score: 4\nPhysics Score: 5\nStyle Score: 3").score == 4
    assert parse_alignment_physics_style("Alignment Score (1-5): 4\nPhysics Score (1-5): 3") is None
    assert parse_alignment_physics_style("Alignment Score (1-5): 9\nPhysics Score (1-5): 3\nStyle Score: 3") is None
    assert parse_pointwise(answer) is None  # the wrong parser does not invent a score


# ------------------------------------------------------------------------------------------ scoring (fake model)
def test_scoring_aggregates_and_counts_unparseable_answers():
    answers = iter(["visual quality: 4\nFinal Score: 8", "no idea", "Final Score: 6", "Final Score: 11"])
    seen = []

    def fake(frames, prompts):
        seen.append(([len(f) for f in frames], prompts))
        return [next(answers) for _ in prompts]

    cfg = UnifiedRewardConfig(num_frames=4, batch_size=3)
    result = score_videos(videos(4), ["a red circle", "b", "c", "d"], fake, cfg, keys=list("wxyz"),
                          show_progress=False)
    assert [len(p) for _, p in seen] == [3, 1]  # batches of 3
    assert seen[0][0] == [4, 4, 4]  # 4 frames sampled from each 9-frame video
    assert "Text Prompt: [a red circle]" in seen[0][1][0]
    assert result["count"] == 4 and result["num_scored"] == 2 and result["num_unparseable"] == 2
    assert result["unparseable"] == ["x", "z"]
    assert result["mean_score"] == 7.0 and result["scale"] == [1.0, 10.0]
    assert result["mean_dimensions"] == {"visual quality": 4.0}
    assert result["per_video"][1]["score"] is None and result["per_video"][1]["answer"] == "no idea"


def test_all_unparseable_gives_no_mean_and_templates_validate():
    result = score_videos(videos(2), ["a", "b"], lambda f, p: ["?"] * len(p),
                          UnifiedRewardConfig(template="alignment_physics_style"), show_progress=False)
    assert result["mean_score"] is None and result["num_unparseable"] == 2 and result["scale"] == [1.0, 5.0]
    with pytest.raises(ValueError, match="answer_format"):
        UnifiedRewardConfig(template="Rate {prompt}").validate()
    with pytest.raises(ValueError, match="template"):
        UnifiedRewardConfig(template="no placeholder").validate()
    with pytest.raises(ValueError, match="num_frames"):
        UnifiedRewardConfig(num_frames=0).validate()
    custom = UnifiedRewardConfig(template="Rate [{prompt}] 1-10", answer_format="pointwise")
    assert build_prompt(custom.prompt_template, "x") == "Rate [x] 1-10"


def test_sample_frames_follows_the_published_rule():
    video = np.arange(10)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8)
    assert [f[0, 0, 0] for f in sample_frames(video, 4)] == [0, 2, 5, 7]
    assert len(sample_frames(video[:2], 8)) == 2  # a short clip gives what it has
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert [f[0, 0, 0] for f in sample_frames(tensor, 4)] == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="uint8"):
        sample_frames(np.zeros((3, 4, 4)), 2)


# --------------------------------------------------------------------------------------- tiny real Qwen2.5-VL
def test_tiny_qwen25_vl_generates_for_video_frames_and_garbage_is_counted():
    generate = tiny_generator()
    frames = [sample_frames(v, 3) for v in videos(2)]
    prompts = [build_prompt(POINTWISE_VIDEO, "a red circle moves to the right"), build_prompt(POINTWISE_VIDEO, "x")]
    answers = generate(frames, prompts)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert generate(frames, prompts) == answers  # greedy decoding is deterministic
    # Left padding: the shorter prompt's answer does not depend on its batch mate.
    assert generate(frames[1:], prompts[1:]) == answers[1:]
    result = score_videos(videos(2), ["a", "b"], generate, UnifiedRewardConfig(num_frames=3), show_progress=False)
    # A random model answers garbage: every answer is counted as unparseable, none is scored.
    assert result["num_unparseable"] == 2 and result["mean_score"] is None


def test_cli_loads_a_local_folder(tmp_path, capsys):
    from infra.video_io import encode_mp4

    generate = tiny_generator()
    folder = tmp_path / "reward"
    generate.model.save_pretrained(folder)
    generate.tokenizer.save_pretrained(folder)
    generate.image_processor.save_pretrained(folder)
    loaded = QwenVLGenerator.from_pretrained(folder, dtype="float32", max_new_tokens=6)
    frames = [sample_frames(v, 2) for v in videos(1)]
    assert loaded(frames, ["hello {x}"]) == generate(frames, ["hello {x}"])

    clips = tmp_path / "clips"
    clips.mkdir()
    for i, video in enumerate(videos(3, t=5, size=32)):
        (clips / f"k{i}.mp4").write_bytes(encode_mp4(video, 8))
    (clips / "k0.txt").write_text("from a txt file")
    (tmp_path / "m.meta.jsonl").write_text(json.dumps({"key": "k1", "caption": "from meta"}) + "\n")
    answers = iter(["Final Score: 5", "Final Score: 9"])
    seen = []

    def fake(frames, prompts):
        seen.extend(prompts)
        return [next(answers) for _ in prompts]

    result = main(["--model", str(folder), "--videos", str(clips), "--meta", str(tmp_path / "m.meta.jsonl"),
                   "--num-frames", "2", "--out", str(tmp_path / "r.json")], generate=fake)
    assert result["videos_without_caption"] == ["k2"]
    assert "[from a txt file]" in seen[0] and "[from meta]" in seen[1]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["mean_score"] == 7.0 and saved["count"] == 2
    # Without a fake, the CLI loads the tiny model from the folder and reports its garbage as unparseable.
    result = main(["--model", str(folder), "--videos", str(clips), "--meta", str(tmp_path / "m.meta.jsonl"),
                   "--num-frames", "2", "--dtype", "float32", "--max-new-tokens", "4"])
    assert result["num_unparseable"] == 2


# ------------------------------------------------------------------------------------ tiny real Qwen3-VL (2.0)
def tiny_qwen3_vl_generator(max_new_tokens=6):
    """UnifiedReward 2.0's small models are Qwen3-VL: a tiny random one, 16-pixel patches, 64x64 frames."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_tokenizer()
    ids = dict(zip(SPECIALS, tokenizer.convert_tokens_to_ids(SPECIALS)))
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, deepstack_visual_indexes=[1], num_position_embeddings=16),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=64 * 64)
    return QwenVLGenerator(model, tokenizer, image_processor, max_new_tokens=max_new_tokens)


def test_a_tiny_qwen3_vl_reward_model_loads_by_its_config_and_scores_end_to_end(tmp_path):
    from infra.video_io import encode_mp4

    generate = tiny_qwen3_vl_generator()
    folder = tmp_path / "reward2"
    for part in (generate.model, generate.tokenizer, generate.image_processor):
        part.save_pretrained(folder)
    loaded = QwenVLGenerator.from_pretrained(folder, dtype="float32", max_new_tokens=6)
    assert type(loaded.model).__name__ == "Qwen3VLForConditionalGeneration"  # from config.json, not hard-coded
    frames = [sample_frames(v, 2) for v in videos(2)]
    prompts = [build_prompt(POINTWISE_VIDEO, "a red circle"), build_prompt(POINTWISE_VIDEO, "x")]
    assert loaded(frames, prompts) == generate(frames, prompts)
    clips = tmp_path / "clips"
    clips.mkdir()
    for i, video in enumerate(videos(2, t=5, size=64)):
        (clips / f"k{i}.mp4").write_bytes(encode_mp4(video, 8))
        (clips / f"k{i}.txt").write_text(f"caption {i}")
    result = main(["--model", str(folder), "--videos", str(clips), "--num-frames", "2", "--dtype", "float32",
                   "--max-new-tokens", "4", "--template", "alignment_physics_style"])
    assert result["count"] == 2 and result["num_unparseable"] == 2  # random weights answer garbage, counted


def test_a_folder_that_is_not_a_qwen_vl_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not a Qwen-VL reward model"):
        QwenVLGenerator.from_pretrained(tmp_path)
