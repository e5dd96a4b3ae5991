"""`sample`: classifier-free guidance, determinism given a generator, and its argument checks."""
import pytest
import torch
from torch import nn

from dcae.diffusion import DEFAULT_STEPS, SAMPLERS, flow_dpm_sigmas, flow_euler_sigmas, make_objective, sample

from .toy import ToyModel, assert_rel_close

SHAPE = (2, 3, 4, 4)
Y = torch.tensor([2, 0])
FLOW = ("flow-euler", "flow-dpm++")
FEW_STEPS = {"ddpm": 6, "ddim": 6, "dpm++2": 6, "dpm++3": 6, "flow-euler": 6, "flow-dpm++": 6}


def _objective(sampler, learn_sigma=False):
    return make_objective("flow") if sampler in FLOW else make_objective("eps", learn_sigma)


def _sample(model, sampler, seed=0, cfg_scale=1.0, learn_sigma=False, **kwargs):
    return sample(model, SHAPE, Y, _objective(sampler, learn_sigma), sampler, FEW_STEPS[sampler], cfg_scale,
                  torch.Generator().manual_seed(seed), dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scale_one_is_the_conditional_model_alone(sampler):
    """cfg_scale 1 calls only forward (no batched uncond branch) and equals sampling the conditional function."""
    model = ToyModel()
    guided = _sample(model, sampler, cfg_scale=1.0)
    assert set(model.calls) == {"forward"}
    assert torch.equal(guided, _sample(ToyModel().forward, sampler))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_goes_through_forward_with_cfg(sampler):
    """cfg_scale w calls forward_with_cfg once per step and equals sampling uncond + w (cond - uncond) computed
    from two plain calls."""
    model, reference = ToyModel(), ToyModel()

    def guided(x, t, y):
        cond, uncond = reference.raw(x, t, y), reference.raw(x, t, torch.full_like(y, reference.num_classes))
        return uncond + 2.5 * (cond - uncond)

    out = _sample(model, sampler, cfg_scale=2.5)
    assert set(model.calls) == {"forward_with_cfg"} and len(model.calls) == FEW_STEPS[sampler]
    assert_rel_close(out, _sample(guided, sampler), 1e-12)
    assert not torch.allclose(out, _sample(ToyModel(), sampler))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2"])
def test_learn_sigma_guides_eps_and_keeps_the_conditional_variance(sampler):
    """With learn_sigma the eps half is guided and the variance half is the conditional branch's (DiT), not the
    all-channel guided output of forward_with_cfg."""
    model = ToyModel(learn_sigma=True)

    def dit_guided(x, t, y):
        cond, uncond = model.raw(x, t, y), model.raw(x, t, torch.full_like(y, model.num_classes))
        return torch.cat([uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)

    out = _sample(model, sampler, cfg_scale=4.0, learn_sigma=True)
    assert_rel_close(out, _sample(dit_guided, sampler, learn_sigma=True), 1e-12)
    if sampler == "ddpm":  # the only sampler that reads the variance half
        all_channels = _sample(lambda x, t, y: model.forward_with_cfg(x, t, y, 4.0), sampler, learn_sigma=True)
        assert not torch.allclose(out, all_channels)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_deterministic_given_a_generator(sampler):
    model = ToyModel().forward
    extra = {"eta": 0.7} if sampler == "ddim" else {}
    first, again = _sample(model, sampler, seed=5, **extra), _sample(model, sampler, seed=5, **extra)
    assert torch.equal(first, again) and first.shape == SHAPE and first.dtype == torch.float64
    assert not torch.allclose(first, _sample(model, sampler, seed=6, **extra))


def test_default_steps_and_a_progress_bar(capsys):
    """steps None takes the sampler's default (flow-dpm++: 20 model calls); progress shows tqdm on stderr."""
    model = ToyModel()
    sample(model, SHAPE, Y, make_objective("flow"), "flow-dpm++", generator=torch.Generator().manual_seed(0),
           progress=True, dtype=torch.float64)
    assert len(model.calls) == DEFAULT_STEPS["flow-dpm++"] == 20
    assert "flow-dpm++2" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "unknown sampler"),
    (dict(steps=0), r"steps must be an int in \[1, 1000\]"),
    (dict(steps=1001), r"steps must be an int in \[1, 1000\]"),
    (dict(sampler="dpm++2", steps=1000), r"\[1, 999\]"),
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(sampler="flow-euler"), "does not fit a 'eps' model"),
    (dict(objective=make_objective("flow")), "does not fit a 'flow' model"),
    (dict(eta=0.5), "eta applies to the ddim sampler only"),
    (dict(sampler="ddim", eta=1.5), "eta must be in"),
    (dict(y=torch.tensor([1, 2, 3])), "y must be"),
    (dict(shape=(2, 3, 4)), "shape must be"),
    (dict(model=ToyModel().forward, cfg_scale=2.0), "forward_with_cfg"),
    (dict(model=ToyModel(learn_sigma=True).forward, cfg_scale=2.0, objective=make_objective("eps", True)),
     "num_classes"),
    (dict(objective="eps"), "objective must be"),
])
def test_bad_arguments_raise_a_one_line_value_error(kwargs, match):
    args = dict(model=ToyModel(), shape=SHAPE, y=Y, objective=make_objective("eps"), sampler="ddpm", steps=4)
    with pytest.raises(ValueError, match=match) as error:
        sample(**{**args, **kwargs})
    assert "\n" not in str(error.value)


def test_a_module_in_training_mode_is_refused():
    class Module(nn.Module):
        def forward(self, x, t, y):
            return x

    with pytest.raises(ValueError, match="eval"):
        sample(Module(), SHAPE, Y, make_objective("eps"), "ddim", 3)
    assert sample(Module().eval(), SHAPE, Y, make_objective("eps"), "ddim", 3).shape == SHAPE


@pytest.mark.parametrize("sampler,objective,expected", [
    ("ddpm", make_objective("eps"), [999, 666, 333, 0]),
    ("ddim", make_objective("eps", schedule="scaled_linear", time_offset=1), [1000, 667, 334, 1]),
    ("dpm++3", make_objective("eps", time_offset=1), [1000, 750, 501, 251]),
    ("flow-euler", make_objective("flow", shift=3.0), (1000 * flow_euler_sigmas(4, 3.0)[:-1]).tolist()),
    ("flow-dpm++", make_objective("flow", shift=2.0), (1000 * flow_dpm_sigmas(4, 2.0)[:-1]).tolist()),
])
def test_the_model_sees_the_documented_timesteps(sampler, objective, expected):
    """eps: the kept step indices (+ time_offset), as float; flow: t = 1000 s on the sampler's sigma grid."""
    seen = []

    def model(x, t, y):
        seen.append(t)
        return 0.1 * x

    sample(model, SHAPE, Y, objective, sampler, 4, dtype=torch.float64)
    assert all(t.shape == (SHAPE[0],) and t.dtype == torch.float64 and bool((t == t[0]).all()) for t in seen)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), torch.tensor(expected, dtype=torch.float64))
