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
