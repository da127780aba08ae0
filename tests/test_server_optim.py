"""Server optimizers against hand computations (oracle tests), and their state surviving a checkpoint."""
import numpy as np
import pytest

from scheduler.optim import make_server_optimizer

THETA = np.array([1.0, -2.0, 0.5], dtype=np.float32)
DELTAS = [np.array([0.1, -0.3, 0.0]), np.array([0.2, 0.1, -0.4]), np.array([-0.1, 0.05, 0.3])]


def run(name, deltas=DELTAS, **kw):
    opt = make_server_optimizer(name, **kw)
    theta = THETA
    for d in deltas:
        theta = opt.step(theta, d.copy())   # a step may overwrite its mean_delta (the scheduler's work buffer)
    return theta, opt


def test_fedavg():
    theta, _ = run("fedavg", server_lr=1.85)
    np.testing.assert_allclose(theta, THETA + 1.85 * sum(DELTAS), rtol=1e-6)


def test_fedavgm():
    theta, _ = run("fedavgm", server_lr=0.5, momentum=0.9)
    v, expect = np.zeros(3), THETA.astype(np.float64)
    for d in DELTAS:
        v = 0.9 * v + d
        expect = expect + 0.5 * v
    np.testing.assert_allclose(theta, expect, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    theta, _ = run(name, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    m, v, expect = np.zeros(3), np.full(3, tau ** 2), THETA.astype(np.float64)
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d ** 2
        elif name == "fedyogi":
            v = v - (1 - b2) * d ** 2 * np.sign(v - d ** 2)
        else:
            v = v + d ** 2
        expect = expect + lr * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(theta, expect, rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_dict_resumes_exactly(name):
    whole, _ = run(name, server_lr=0.3)
    first, opt = run(name, deltas=DELTAS[:2], server_lr=0.3)
    fresh = make_server_optimizer(name, server_lr=0.3)
    fresh.load_state_dict({k: np.array(v) for k, v in opt.state_dict().items()})
    np.testing.assert_array_equal(fresh.step(first, DELTAS[2].copy()), whole)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown server optimizer 'sgd'"):
        make_server_optimizer("sgd", server_lr=1.0)


# -- the scheduler's one pass (scheduler.aggregate.server_step) against the passes one after another ---------

def whole_array_step(name, state, theta, mean, lr=0.3, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """The optimizers as whole-array numpy expressions (their code before the one-pass step): the reference."""
    if name == "fedavg":
        return (mean * lr + theta).astype(np.float32)
    if name == "fedavgm":
        state["v"] = momentum * state.get("v", np.zeros_like(mean)) + mean
        return (theta.astype(np.float64) + lr * state["v"]).astype(np.float32)
    m, v = state.get("m", np.zeros_like(mean)), state.get("v", np.full_like(mean, tau ** 2))
    m = b1 * m + (1 - b1) * mean
    sq = mean * mean
    v = {"fedadam": lambda: b2 * v + (1 - b2) * sq, "fedyogi": lambda: v - (1 - b2) * sq * np.sign(v - sq),
         "fedadagrad": lambda: v + sq}[name]()
    state.update(m=m, v=v)
    return (theta.astype(np.float64) + lr * m / (np.sqrt(v) + tau)).astype(np.float32)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_the_one_pass_step_has_the_bits_of_the_plain_passes(name, ranks):
    from scheduler.aggregate import BLOCK, server_step

    size = 3 * BLOCK + 123          # several blocks, over the pool's threads, and a short last one
    rng = np.random.default_rng(1)
    opt, state = make_server_optimizer(name, server_lr=0.3), {}
    theta = expect = rng.normal(size=size).astype(np.float32)
    mirror, work = np.zeros(size, np.float32), np.empty(size)
    for _ in range(3):
        parts = [rng.normal(size=size) * 10.0 ** rng.integers(-6, 3, size=size) for _ in range(ranks)]
        weight = 7.0 + ranks
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        expect = whole_array_step(name, state, expect, total / weight)
        before = theta.copy()
        result = server_step(parts, weight, theta, opt, work=work, mirror=mirror)
        np.testing.assert_array_equal(theta, before)                  # the old version is left as it was
        np.testing.assert_array_equal(result.params, expect)
        np.testing.assert_array_equal(mirror, expect)
        theta = result.params


class WholeArrayOnly:
    """A server step with no `step_block` (as a Flower strategy, or a user's own): the plain passes."""

    def step(self, params, mean_delta):
        return (params + 2.0 * mean_delta).astype(np.float32)


@pytest.mark.parametrize("opt", [WholeArrayOnly(), make_server_optimizer("fedavg", server_lr=2.0)])
def test_the_one_pass_step_checks_the_update_and_the_result(opt):
    from scheduler.aggregate import server_step

    theta = np.ones(5, np.float32)
    ok = server_step([np.full(5, 3.0)], 3.0, theta, opt)
    np.testing.assert_array_equal(ok.params, np.full(5, 3.0, np.float32))
    assert ok.update_finite and ok.params_finite
    bad = np.full(5, 1.0)
    bad[3] = np.nan
    result = server_step([bad], 1.0, theta, opt)
    assert result.params is None and not result.update_finite
    with np.errstate(over="ignore"):
        result = server_step([np.full(5, 1e300)], 1.0, theta, opt)    # finite in float64, not in float32
    assert result.params is None and result.update_finite and not result.params_finite
    assert server_step([np.ones(5)], 0.0, theta, opt).params is None   # no client contributed
    np.testing.assert_array_equal(theta, np.ones(5, np.float32))
