"""LoRA fine-tuning of the DiT through peft (dit/lora.py): adapters on a frozen base, merged weights equal the adapted
model, the exported adapter loads into diffusers' CogVideoXTransformer3DModel and gives the same outputs, and a tiny
LoRA run through dit.train trains only the adapters, lowers its loss and resumes exactly."""
import json

import pytest
import torch

from dit import CogVideoXTransformer, export_diffusers
from dit.lora import LORA_DIR, LoraConfig, add_adapters, adapter_state_dict, export_adapter, load_base, \
    merged_state_dict
from infra.config import ConfigError
from test_dit_transformer import inputs, reference_output, tiny_config
from conftest import LORA_ARGS
from run_helpers import start_from_checkpoint_of, steps_after
from test_t2v_train import logged_losses, run_t2v

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["to_q", "to_v", "to_out.0", "ff.net.2"]


def perturbed_model(config, seed: int = 0) -> CogVideoXTransformer:
    torch.manual_seed(seed)
    model = CogVideoXTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def adapted(tmp_path):
    """A perturbed tiny base exported as a diffusers folder, a fresh model loaded from it with rank-4 adapters whose
    B matrices are non-zero (fresh adapters are a no-op)."""
    config = tiny_config(positional_embedding="rope")
    export_diffusers(perturbed_model(config), tmp_path / "base")
    cfg = LoraConfig(enabled=True, base=str(tmp_path / "base"), rank=4, alpha=8.0, target_modules=TARGETS)
    cfg.validate()
    model = CogVideoXTransformer(config)
    load_base(model, cfg)
    add_adapters(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval(), cfg, config


def test_only_adapters_train_and_merging_keeps_the_outputs(adapted):
    model, cfg, config = adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 4 targets x (A, B)
    assert len(trainable) == 2 * len(TARGETS) * 2
    latents, text, timestep = inputs(config, 3, 8, 8)
    dense = CogVideoXTransformer(config).eval()
    dense.load_state_dict(merged_state_dict(model))  # strict: the plain model's names exactly
    with torch.no_grad():
        adapted_out = model(latents, text, timestep)
        torch.testing.assert_close(dense(latents, text, timestep), adapted_out, atol=1e-5, rtol=0)
        base = CogVideoXTransformer(config).eval()
        load_base(base, cfg)
        assert (base(latents, text, timestep) - adapted_out).abs().max() > 1e-3  # the adapters do something


def test_exported_adapter_loads_into_diffusers_with_the_same_outputs(adapted, tmp_path):
    model, cfg, config = adapted
    folder = export_adapter(model, cfg, tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys == {f"transformer.{k}" for k in adapter_state_dict(model)}
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8.0
    # What CogVideoXPipeline.load_lora_weights(folder) does: read the file with its metadata (alpha), then load it
    # into the transformer.
    from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin

    state_dict, lora_metadata = CogVideoXLoraLoaderMixin.lora_state_dict(folder, return_lora_metadata=True)
    reference = diffusers.CogVideoXTransformer3DModel.from_pretrained(cfg.base).eval()
    reference.load_lora_adapter(state_dict, prefix="transformer", metadata=lora_metadata)
    latents, text, timestep = inputs(config, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reference_output(reference, config, latents, text, timestep),
                                   model(latents, text, timestep), atol=1e-4, rtol=0)


def test_bad_lora_configs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"lora\.base: is required"):
        LoraConfig(enabled=True).validate()
    with pytest.raises(ValueError, match=r"lora\.base: .*\(no config\.json\)"):
        LoraConfig(enabled=True, base=str(tmp_path)).validate()
    config = tiny_config()
    export_diffusers(perturbed_model(config), tmp_path / "base")
    with pytest.raises(ValueError, match=r"lora\.target_modules: .*convolution"):
        LoraConfig(enabled=True, base=str(tmp_path / "base"), target_modules=["patch_embed.proj"]).validate()
    with pytest.raises(ValueError, match=r"lora\.rank: must be >= 1"):
        LoraConfig(enabled=True, base=str(tmp_path / "base"), rank=0).validate()
    cfg = LoraConfig(enabled=True, base=str(tmp_path / "base"), target_modules=["no_such_layer"])
    with pytest.raises(ConfigError, match=r"lora\.target_modules: .* match no Linear"):
        add_adapters(CogVideoXTransformer(config), cfg)
    wider = CogVideoXTransformer(tiny_config(num_layers=3))
    with pytest.raises(ConfigError, match=r"lora\.base: .* does not fit"):
        load_base(wider, LoraConfig(enabled=True, base=str(tmp_path / "base")))


# ------------------------------------------------------------------------------------------ dit.train LoRA runs


def test_lora_run_trains_only_adapters_and_its_loss_falls(lora_runs, lora_whole):
    from dit.convert import _load_diffusers_folder

    _, root = lora_runs
    values = [v for _, v in sorted(logged_losses(lora_whole).items())]
    assert len(values) == 12
    assert sum(values[-4:]) / 4 < 0.9 * sum(values[:4]) / 4, values
    _, before = _load_diffusers_folder(root / "base/dit")
    _, after = _load_diffusers_folder(lora_whole / "dit")  # the base with the adapters merged
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = LoraConfig().target_modules
    adapted = {k for k in before if any(k.endswith(f".{t}.weight") for t in targets)}
    assert changed and changed <= adapted, sorted(changed - adapted)
    assert (lora_whole / LORA_DIR / "pytorch_lora_weights.safetensors").is_file()


def test_lora_run_resumes_exactly(lora_runs, lora_whole):
    config, root = lora_runs
    parts = root / "parts"
    args = (f"lora.base={root / 'base/dit'}", *LORA_ARGS)
    start_from_checkpoint_of(lora_whole, parts, 6)
    run_t2v(config, parts, *args)
    assert logged_losses(parts) == steps_after(logged_losses(lora_whole), 6) != {}
