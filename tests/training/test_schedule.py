"""NVIDIA's LR noise, cycles and cool-down, applied per step; the optimizer mapping of --opt."""
import math

import pytest
import torch

from training.config import TrainConfig
from training.schedule import build_optimizer, load_optimizer_state, lr_lambda, lr_noise, scheduled_epochs

SPE = 4  # steps per epoch


def cfg(**kw):
    base = dict(lr=0.1, warmup_epochs=0, warmup_lr=1e-4, min_lr=1e-5, epochs=10, sched="cosine", seed=7)
    return TrainConfig(**{**base, **kw})


def test_noise_only_inside_its_range_bounded_and_seeded():
    plain, noisy = lr_lambda(cfg(), SPE), lr_lambda(cfg(lr_noise=(0.4, 0.9)), SPE)
    for epoch in range(10):
        ratio = noisy(epoch * SPE + 1) / plain(epoch * SPE + 1)
        if 4 <= epoch < 9:
            assert ratio != 1.0 and abs(ratio - 1) < 0.67
            assert ratio == pytest.approx(noisy(epoch * SPE + 3) / plain(epoch * SPE + 3))  # one draw per epoch
        else:
            assert ratio == 1.0
    assert lr_noise(cfg(lr_noise=(0.4, 0.9)), 5) == lr_noise(cfg(lr_noise=(0.4, 0.9)), 5)
    assert lr_noise(cfg(lr_noise=(0.4, 0.9)), 5) != lr_noise(cfg(lr_noise=(0.4, 0.9), seed=8), 5)
    assert abs(lr_noise(cfg(lr_noise=(0.0,), lr_noise_pct=0.1), 3)) < 0.1  # one value: on from there


def test_cycles_and_cooldown():
    c = cfg(epochs=4, lr_cycle_limit=2, lr_cycle_mul=2.0, decay_rate=0.5, cooldown_epochs=3)
    assert scheduled_epochs(c) == 4 + 8 + 3
    f = lr_lambda(c, SPE)
    assert 0.1 * f(0) == pytest.approx(0.1)
    assert 0.1 * f(4 * SPE) == pytest.approx(0.05)  # the second cycle peaks at lr * decay_rate
    mid = 4 * SPE + 4 * SPE  # half way through the 8-epoch second cycle
    assert 0.1 * f(mid) == pytest.approx(0.5e-5 + 0.5 * (0.05 - 0.5e-5))
    for epoch in range(12, 15):
        assert 0.1 * f(epoch * SPE) == pytest.approx(1e-5)  # cool-down at min_lr
    assert scheduled_epochs(cfg(cooldown_epochs=2)) == 12


def test_default_schedule_is_unchanged():
    f = lr_lambda(cfg(warmup_epochs=1), SPE)
    assert f(0) == pytest.approx(1e-3) and f(SPE) == pytest.approx(1.0)
    t = (5 * SPE - SPE) / (10 * SPE - SPE)
    assert 0.1 * f(5 * SPE) == pytest.approx(1e-5 + 0.5 * (0.1 - 1e-5) * (1 + math.cos(math.pi * t)))
    assert f(10 * SPE) == pytest.approx(1e-4)


@pytest.mark.parametrize("opt, kind, nesterov", [("fusedmomentum", torch.optim.SGD, False),
                                                 ("fusedsgd", torch.optim.SGD, True),
                                                 ("momentum", torch.optim.SGD, False),
                                                 ("lamb", torch.optim.AdamW, None),
                                                 ("fusedlamb", torch.optim.AdamW, None),
                                                 ("novograd", torch.optim.AdamW, None),
                                                 ("fusedadam", torch.optim.Adam, None)])
def test_optimizer_mapping(opt, kind, nesterov):
    o = build_optimizer(cfg(opt=opt, weight_decay=1e-4), torch.nn.Linear(2, 2))
    assert type(o) is kind
    if nesterov is not None:
        assert o.defaults["nesterov"] is nesterov
    if "novograd" in opt:
        assert o.defaults["betas"] == (0.95, 0.98)
    assert o.defaults["fused"] is True  # one pass over all tensors, not a Python loop per tensor


def test_fused_optimizer_takes_the_same_step_as_the_loop(monkeypatch):
    import training.schedule as schedule

    torch.manual_seed(0)
    for opt in ("adamw", "sgd", "momentum"):
        a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        b.load_state_dict(a.state_dict())
        fused = build_optimizer(cfg(opt=opt, weight_decay=1e-2, lr=1e-2), a)
        with monkeypatch.context() as m:
            m.setattr(schedule, "fused_kw", lambda params: {"foreach": False})
            loop = build_optimizer(cfg(opt=opt, weight_decay=1e-2, lr=1e-2), b)
        assert fused.defaults["fused"] and not loop.defaults["fused"]
        x = torch.randn(16, 8)
        for _ in range(3):
            for model, o in ((a, fused), (b, loop)):
                o.zero_grad()
                model(x).square().mean().backward()
                o.step()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)


def test_resume_keeps_this_runs_optimizer_implementation(monkeypatch):
    """A checkpoint written by a loop-implementation optimizer resumes fused (and the other way round)."""
    import training.schedule as schedule

    a = torch.nn.Linear(4, 2)
    with monkeypatch.context() as m:
        m.setattr(schedule, "fused_kw", lambda params: {"foreach": False})
        old = build_optimizer(cfg(opt="adamw"), a)
    a(torch.randn(3, 4)).sum().backward()
    old.step()
    new = build_optimizer(cfg(opt="adamw"), a)
    load_optimizer_state(new, old.state_dict())
    assert all(g["fused"] is True and g["foreach"] is None for g in new.param_groups)
    assert new.state_dict()["state"][0]["exp_avg"].equal(old.state_dict()["state"][0]["exp_avg"])
    plain = torch.optim.AdamW(schedule.param_groups(a, 0.0))  # load_state_dict alone: the checkpoint's flags win
    plain.load_state_dict(new.state_dict())
    assert plain.param_groups[0]["fused"] is True
