"""U-ViT against an independent functional version of efficientvit's forward (weights in its layout, loaded through
our converter), and its long skips."""
import pytest
import safetensors.torch
import torch

from dcae.models.transformer_config import get_dit_config, get_uvit_config
from dcae.models.uvit import UViT

from .transformer_reference import authors_uvit_state, efficientvit_uvit_forward, randomize


@pytest.mark.parametrize("patch", [1, 2])
def test_equals_efficientvits_uvit(tmp_path, patch):
    cfg = get_uvit_config("uvit-tiny", latent_shape=(4, 8, 4), patch_size=patch, depth=2)
    state = authors_uvit_state(cfg)
    safetensors.torch.save_file({"uvit." + k: v for k, v in state.items()}, tmp_path / "uvit.safetensors")
    model = UViT.from_pretrained(tmp_path / "uvit.safetensors", config=cfg)
    x, t, y = torch.randn(2, 4, 8, 4), torch.tensor([1.0, 999.0]), torch.tensor([7, cfg.num_classes])
    with torch.no_grad():
        out = model(x, t, y)
        torch.testing.assert_close(out, efficientvit_uvit_forward(state, cfg, x, t, y), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, efficientvit_uvit_forward(state, cfg, x, t, y, skip_scale=0.0), atol=1e-3)


def test_output_depends_on_every_long_skip():
    model = randomize(UViT(get_uvit_config("uvit-tiny", latent_shape=(8, 4, 4), depth=4)), std=0.05)
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([10.0, 20.0]), torch.tensor([1, 2])
    with torch.no_grad():
        full = model(x, t, y)
        for block in model.out_blocks:
            handle = block.register_forward_pre_hook(lambda module, args: (args[0], torch.zeros_like(args[1])))
            cut = model(x, t, y)
            handle.remove()
            assert (cut - full).abs().max() > 1e-3
        torch.testing.assert_close(model(x, t, y), full, rtol=0, atol=0)


def test_variants_run_and_the_time_and_class_tokens_matter():
    model = randomize(UViT(get_uvit_config("uvit-tiny", attention="linear", ffn="glumbconv", patch_size=2, depth=2,
                                           learn_sigma=True)), std=0.05)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 1.0]), torch.tensor([3, 3]))
        assert out.shape == (2, 16, 8, 8)
        assert not torch.allclose(out, model(x, torch.tensor([500.0, 1.0]), torch.tensor([3, 3])), atol=1e-4)
        assert not torch.allclose(out, model(x, torch.tensor([1.0, 1.0]), torch.tensor([3, 10])), atol=1e-4)


def test_wrong_config_type_is_refused():
    with pytest.raises(TypeError, match="UViTConfig"):
        UViT(get_dit_config("dit-tiny"))


def test_save_pretrained_refuses_the_diffusers_format(tmp_path):
    with pytest.raises(ValueError, match="diffusers has no U-ViT model"):
        UViT(get_uvit_config("uvit-tiny")).save_pretrained(tmp_path, format="diffusers")
    assert not any(tmp_path.iterdir())
