import math

import pytest
import torch
from torch import nn

from dcae.train.ema import EMA
from dcae.train.schedule import build_scheduler, lr_lambda


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def test_ema_tracks_trainable_parameters_and_buffers():
    ema = EMA(_model(), decay=0.9, warmup=False)
    assert set(ema.params) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert set(ema.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_ema_update_math():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False)
    old = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
        model[0].weight.add_(1.0)  # frozen: not tracked
    ema.update(model)
    torch.testing.assert_close(ema.params["2.weight"], 0.9 * old + 0.1 * model[2].weight)
    assert torch.all(ema.buffers["1.running_mean"] == 3.0)
    assert ema.num_updates == 1


def test_ema_warmup_decay():
    ema = EMA(_model(), decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99


def test_ema_shadow_is_fp32_for_half_model():
    model = _model().half()
    ema = EMA(model, decay=0.5, warmup=False)
    assert all(p.dtype == torch.float32 for p in ema.params.values())
    ema.update(model)
    ema.copy_to(model)
    assert model[2].weight.dtype == torch.float16


def test_swapped_puts_ema_weights_in_and_restores_them():
    model = _model()
    ema = EMA(model, decay=0.0, warmup=False)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ema.update(model)  # decay 0: shadow = current weights
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[1].running_var.fill_(7.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        torch.testing.assert_close(model[2].weight, ema.params["2.weight"])
        assert torch.all(model[1].running_var == 1.0)
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_ema_state_dict_round_trip():
    model = _model()
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[2].bias.add_(2.0)
    ema.update(model)
    other = EMA(_model(), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    assert all(torch.equal(other.params[k], ema.params[k]) for k in ema.params)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"num_updates": 0, "weights": {}})


def test_cosine_schedule_key_steps():
    f = lr_lambda("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert [f(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_constant_schedule_and_no_warmup():
    f = lr_lambda("constant", warmup_steps=4, total_steps=100)
    assert [f(s) for s in (0, 2, 4, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_lambda("cosine", warmup_steps=0, total_steps=10)(0) == 1.0
    with pytest.raises(ValueError, match="kind"):
        lr_lambda("linear", 0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_lambda("cosine", 20, 10)


def test_build_scheduler_drives_optimizer_lr():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 0.0])
