"""dcae_kernels.patch / unpatch on random-weight diffusers models (fp32, CPU): a patched AutoencoderDC ("in" and
"sana" layouts) and SanaTransformer2DModel compute what the unpatched ones compute, forward and backward, on the
ops (their calls are counted); state dicts, save/load, idempotence, unpatch and the report of what is left.

The equality tests run the ops' plain-torch reference (each op is tested against it in its own file); one test
runs the patched autoencoder through the Triton kernels under the interpreter.
"""
import copy
import logging
import sys
from collections import Counter

import pytest
import torch

import dcae_kernels as dk

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC, AutoencoderKL, SanaTransformer2DModel  # noqa: E402
from diffusers.models.attention_processor import (SanaLinearAttnProcessor2_0,  # noqa: E402
                                                  SanaMultiscaleAttnProcessor2_0)
from diffusers.models.autoencoders.autoencoder_dc import ResBlock  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402
from diffusers.models.transformers.sana_transformer import GLUMBConv  # noqa: E402

from ..random_weights import randomize_  # noqa: E402

PATCH = sys.modules["dcae_kernels.patch"]  # the module (``dk.patch`` is the function)
RTOL = 1e-5
# Each report field and the op a patched piece of that kind calls once per forward.
OPS = {"down_shortcuts": "space_to_channel_avg", "up_shortcuts": "channel_to_space_dup", "rms_norms": "rms_norm_2d",
       "attentions": "relu_linear_attention"}

# Tiny AutoencoderDCs (spatial ratio 4, head_dim 4): 16 px images give 4x4 attention stages (N = 16: the linear
# form), 8 px ones 2x2 (N = 4 = head_dim: diffusers' quadratic form).
IN = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
          encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
          decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
          encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
          encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 1, 1),
          encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
          decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"), decoder_act_fns=("relu", "relu", "silu"))
SANA = dict(IN, encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types=("rms_norm", "rms_norm", "batch_norm"), decoder_act_fns="silu")
NO_SHORTCUT = "without a shortcut (a conv only: nothing to map)"
REPORTS = {  # (patched counts, unpatched reasons)
    "in": (dict(down_shortcuts=2, up_shortcuts=2, rms_norms=6, fused_residuals=5, attentions=2),
           {f"DCDownBlock2d {NO_SHORTCUT}": 1, f"DCUpBlock2d {NO_SHORTCUT}": 1,
            "ResBlock (batch_norm norm: only RMSNorm maps onto rms_norm_2d)": 1}),
    "sana": (dict(down_shortcuts=3, up_shortcuts=3, rms_norms=8, fused_residuals=7, attentions=2),
             {"SanaMultiscaleLinearAttention norm_out BatchNorm2d (only RMSNorm maps onto rms_norm_2d)": 1}),
}


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")


@pytest.fixture
def calls(monkeypatch):
    """How often each op is called from dcae_kernels.patch."""
    counter = Counter()
    for name in (*OPS.values(), "relu_linear_attention_tokens", "relu_linear_attention_tokens_state",
                 "relu_linear_attention_tokens_apply"):
        def counted(*args, _op=getattr(PATCH, name), _name=name, **kwargs):
            counter[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(PATCH, name, counted)
    return counter


def autoencoder(layout: str) -> AutoencoderDC:
    torch.manual_seed(0)
    return randomize_(AutoencoderDC(**{"in": IN, "sana": SANA}[layout]))


def transformer() -> SanaTransformer2DModel:
    torch.manual_seed(0)
    return randomize_(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=4, qk_norm="rms_norm_across_heads"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(model, *inputs, **kwargs):
    """Output, and the gradients of a fixed random projection of it w.r.t. the first input and the parameters."""
    x, *rest = inputs
    x = x.clone().requires_grad_(True)
    y = model(x, *rest, **kwargs).sample
    model.zero_grad()
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return y.detach(), x.grad, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_run(patched, unpatched):
    """Outputs and input gradients within RTOL; parameter gradients within RTOL all together, 5 RTOL each (a few
    ill-conditioned ones, e.g. of the multi-scale depthwise conv of an attention with a BatchNorm norm_out, differ
    by ~1.5e-5 between two summation orders: unpatched diffusers itself is that far from an fp64 run there)."""
    (y, dx, grads), (y0, dx0, grads0) = patched, unpatched
    assert rel_err(y, y0) <= RTOL and rel_err(dx, dx0) <= RTOL
    assert grads.keys() == grads0.keys()
    assert rel_err(torch.cat([g.flatten() for g in grads.values()]),
                   torch.cat([g.flatten() for g in grads0.values()])) <= RTOL
    assert max(rel_err(grads[name], grads0[name]) for name in grads) <= 5 * RTOL


def assert_report(report, layout):
    counts, reasons = REPORTS[layout]
    assert {name: getattr(report, name) for name in counts} == counts
    assert dict(report.unpatched) == reasons


@pytest.mark.parametrize("layout", ["in", "sana"])
def test_autoencoder_matches_unpatched(layout, reference_ops, calls):
    model = autoencoder(layout)
    assert_report(dk.patch_report(model), layout)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    small = x[:, :, :8, :8]
    unpatched = run(model, x), run(model, small)
    assert not calls
    assert dk.patch(model) is model
    report = dk.patch_report(model)
    assert_report(report, layout)
    assert_same_run(run(model, x), unpatched[0])
    assert calls == Counter({op: getattr(report, field) for field, op in OPS.items()})
    calls.clear()
    assert_same_run(run(model, small), unpatched[1])  # N <= head_dim: the attentions run diffusers' own form
    assert calls["relu_linear_attention"] == 0 and calls["space_to_channel_avg"] == report.down_shortcuts


def test_autoencoder_on_triton_interpreter(monkeypatch, calls):
    """The same through the Triton kernels (the interpreter on CPU): every op's forward and backward kernels."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "auto")
    assert dk.backend() == "triton"
    model = autoencoder("in")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    unpatched = run(model, x)
    assert_same_run(run(dk.patch(model), x), unpatched)
    assert calls["relu_linear_attention"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_models_on_gpu(dtype, calls):
    """On CUDA (compiled Triton kernels), outputs: fp32 within the tf32 tolerance of the linear-attention kernels'
    dots; bf16 about as close to the fp32 unpatched output as diffusers' own bf16 output is. (Gradients through
    these random nets are not compared in bf16: rounding noise grows through the layers until diffusers' own bf16
    input gradient is ~20% off its fp32 one. Each op's gradients are tested on the GPU in its own file.)"""
    g = torch.Generator().manual_seed(0)
    cases = [(autoencoder("sana"), (torch.randn(2, 3, 32, 32, generator=g),)),
             (transformer(), (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g),
                              torch.tensor([3, 700])))]
    for model, inputs in cases:
        model = model.cuda()
        inputs = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in inputs]
        with torch.no_grad():
            exact = model(*[t.float() if t.is_floating_point() else t for t in inputs]).sample
            unpatched = model.to(dtype)(*inputs).sample
            patched = dk.patch(model)(*inputs).sample
        if dtype == torch.float32:
            assert rel_err(patched, unpatched) <= 5e-3
        else:
            assert rel_err(patched, exact) <= 2 * rel_err(unpatched, exact) + 1e-3
    assert calls["relu_linear_attention"] == 2 and calls["relu_linear_attention_tokens"] == 1


def test_transformer_matches_unpatched(reference_ops, calls):
    model = transformer()
    report = dk.patch_report(model)
    assert report.patched == report.attentions == 1
    assert dict(report.unpatched) == {
        "Attention with SanaAttnProcessor2_0 (only SanaLinearAttnProcessor2_0's ReLU linear attention maps onto "
        "the ops)": 1,
        "GLUMBConv (Mix-FFN without a norm: no op here fuses its convolutions and gate)": 1,
        "RMSNorm outside a DC-AE block (e.g. over tokens: rms_norm_2d normalises the channels of (B, C, H, W))": 5}
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 4, size, size, generator=g), torch.randn(2, 3, 8, generator=g), torch.tensor([3, 700]))
              for size in (4, 2)]  # 16 tokens > head_dim 8: the fused op; 4 tokens: state + apply
    unpatched = [run(model, *i) for i in inputs]
    dk.patch(model)
    assert_same_run(run(model, *inputs[0]), unpatched[0])
    assert calls == Counter(relu_linear_attention_tokens=1)
    calls.clear()
    assert_same_run(run(model, *inputs[1]), unpatched[1])
    assert calls == Counter(relu_linear_attention_tokens_state=1, relu_linear_attention_tokens_apply=1)
    attn = model.transformer_blocks[0].attn1  # over other tokens (diffusers' processor accepts them): state + apply
    tokens, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        out = attn(tokens, encoder_hidden_states=context)
        assert rel_err(out, attn.processor.original(attn, tokens, context)) <= RTOL
    dk.unpatch(model)
    assert type(model.transformer_blocks[0].attn1.processor) is SanaLinearAttnProcessor2_0


def test_state_dict_unchanged_and_unpatch_restores(reference_ops):
    model = autoencoder("sana")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = model(x).sample
    state = model.state_dict()
    processors = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    dk.patch(model)
    patched = model.state_dict()
    assert list(patched) == list(state) and all(patched[k] is state[k] or torch.equal(patched[k], state[k])
                                                for k in state)
    assert any("forward" in vars(m) for m in model.modules())
    assert dk.unpatch(model) is model
    assert not any("forward" in vars(m) for m in model.modules())
    assert {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert all(type(p) is SanaMultiscaleAttnProcessor2_0 for p in processors.values())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x).sample, before)


def test_save_pretrained_round_trip(tmp_path, reference_ops):
    model = dk.patch(autoencoder("in"))
    x = torch.randn(1, 3, 16, 16)
    model.save_pretrained(tmp_path)
    loaded = AutoencoderDC.from_pretrained(tmp_path).eval()
    assert not any("forward" in vars(m) for m in loaded.modules())
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(state) and all(torch.equal(loaded_state[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(dk.patch(loaded)(x).sample, model(x).sample)


def test_patch_is_idempotent_and_copies_stay_patched(reference_ops):
    model = autoencoder("in")
    unpatched = {name: dict(vars(m)) for name, m in model.named_modules()}
    dk.unpatch(model)  # nothing to undo
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == unpatched
    dk.patch(model)
    swapped = {name: (vars(m).get("forward"), getattr(m, "processor", None)) for name, m in model.named_modules()}
    report = str(dk.patch_report(model))
    dk.patch(model)
    assert {name: (vars(m).get("forward"), getattr(m, "processor", None))
            for name, m in model.named_modules()} == swapped
    assert str(dk.patch_report(model)) == report
    assert all(type(m.processor.original) is SanaMultiscaleAttnProcessor2_0
               for m in model.modules() if hasattr(m, "processor"))
    twin = copy.deepcopy(model)  # e.g. an EMA copy: patched too, each forward bound to its own module
    assert all(vars(m)["forward"].args[0] is m for m in twin.modules() if "forward" in vars(m))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(twin(x).sample, model(x).sample)
    dk.unpatch(dk.unpatch(model))
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == unpatched


def test_nothing_to_patch_warns_and_returns_the_model_unchanged():
    linear = torch.nn.Linear(3, 3)
    with pytest.warns(UserWarning, match=r"nothing to patch in Linear; returned unchanged"):
        assert dk.patch(linear) is linear
    assert "forward" not in vars(linear)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    state = vae.state_dict()
    with pytest.warns(UserWarning, match=r"nothing to patch in AutoencoderKL \(left unpatched: 2 x Attention with "
                                         r"AttnProcessor2_0"):
        assert dk.patch(vae) is vae
    assert not any("forward" in vars(m) for m in vae.modules())
    assert all(torch.equal(vae.state_dict()[k], state[k]) for k in state)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dk.patch("model")


def test_unmappable_variants_are_left_and_counted(reference_ops, caplog):
    model = autoencoder("in")
    attn = model.encoder.down_blocks[2][0].attn
    attn.nonlinearity = torch.nn.GELU()  # a variant the ReLU op cannot compute
    down = model.encoder.down_blocks[1][1]
    hooked = down.forward  # a forward someone else replaced (e.g. a hook): left alone
    down.forward = hooked
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).sample
    with caplog.at_level(logging.INFO, logger="dcae_kernels.patch"):
        dk.patch(model)
    report = dk.patch_report(model)
    assert (report.attentions, report.down_shortcuts, report.rms_norms) == (1, 1, 5)
    assert report.unpatched["SanaMultiscaleLinearAttention (nonlinearity GELU: the op is ReLU linear attention)"] == 1
    assert report.unpatched["DCDownBlock2d (its forward was already replaced, e.g. by a hook)"] == 1
    assert f"dcae_kernels.patch(AutoencoderDC): {report}" in caplog.text
    assert type(attn.processor) is SanaMultiscaleAttnProcessor2_0 and down.forward is hooked
    with torch.no_grad():
        assert rel_err(model(x).sample, expected) <= RTOL
    dk.unpatch(model)
    assert down.forward is hooked


@pytest.mark.parametrize("case", ["bf16", "autocast", "autocast-bf16-input", "fp64", "no-weight", "no-bias"])
def test_rms_norm_follows_diffusers_dtypes(case, calls):
    """A patched ResBlock returns diffusers' dtype (fp32 from bf16 convs with fp32 norm weights under autocast),
    equal up to the rounding of that dtype; fp64 runs diffusers' own code; norms without weight or bias map (the
    one without weight in a GLUMBConv without residual: the norm alone)."""
    torch.manual_seed(0)
    if case == "no-weight":
        block = GLUMBConv(8, 8, norm_type="rms_norm", residual_connection=False)
    else:
        block = ResBlock(8, 8, norm_type="rms_norm", act_fn="silu")
    if case in ("no-weight", "no-bias"):
        block.norm = RMSNorm(8, eps=1.0, elementwise_affine=case == "no-bias", bias=False)  # eps matters
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    randomize_(block).to(dtype)
    x = torch.randn(2, 8, 5, 3, dtype=torch.bfloat16 if case == "autocast-bf16-input" else dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("autocast")), torch.no_grad():
        expected = block(x)
        actual = dk.patch(block)(x)
    assert actual.dtype == expected.dtype == (torch.float32 if case.startswith("autocast") else dtype)
    assert calls["rms_norm_2d"] == (0 if case == "fp64" else 1)
    if case == "fp64":
        assert torch.equal(actual, expected)
    else:
        assert rel_err(actual, expected) <= (1e-2 if case == "bf16" else RTOL)
