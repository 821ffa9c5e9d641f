"""Activations and initialisations by name, in every model that takes them; zero-initialisation symmetry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dtrain.errors import ConfigError
from dtrain.models import MODELS
from dtrain.models.base import DataMeta
from dtrain.models.cnn import CNN, CNNConfig
from dtrain.models.layers import ACTIVATIONS, INITS, Swish, activation, init_weight
from dtrain.models.mlp import MLP, MLPConfig
from dtrain.models.recurrent import LSTMConfig, Recurrent, RNNConfig
from tests.helpers import JOBS

DIGITS = DataMeta(input_shape=(64,), num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:n])


def test_binary_step_forward_and_straight_through_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    y = activation("binary_step")(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    # The true derivative is 0 almost everywhere; the straight-through estimator passes 1 where |x| <= 1.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_activations_compute_their_functions():
    x = torch.linspace(-3, 3, 13)
    assert torch.allclose(activation("sigmoid")(x), 1 / (1 + torch.exp(-x)))
    assert torch.allclose(activation("tanh")(x), torch.tanh(x))
    assert torch.equal(activation("relu")(x), x.clamp(min=0))
    assert torch.allclose(activation("leaky_relu", slope=0.2)(x), torch.where(x > 0, x, 0.2 * x))
    soft = activation("softmax")(x.reshape(1, -1))
    assert torch.allclose(soft.sum(), torch.tensor(1.0)) and bool((soft > 0).all())
    assert torch.allclose(activation("swish", beta=2.0)(x), x * torch.sigmoid(2.0 * x))
    assert torch.equal(activation("identity")(x), x)
    with pytest.raises(ConfigError, match="model.activation"):
        activation("gelu")


def test_swish_beta_is_learned_only_when_asked():
    fixed, learned = Swish(1.0), Swish(1.0, learnable=True)
    assert not list(fixed.parameters()) and "beta" in dict(fixed.named_buffers())
    assert [p for p in learned.parameters()] == [learned.beta]
    model = MLP(MLPConfig(hidden=[16], activation="swish", learnable_beta=True, init="xavier"), DIGITS)
    betas = [m.beta for m in model.modules() if isinstance(m, Swish)]
    x, y = _digits(200)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        model((x, y)).loss.backward()
        opt.step()
    assert betas and betas[0].item() != pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_trains_an_mlp_and_a_cnn(name):
    x, y = _digits(256)
    for model in (MLP(MLPConfig(hidden=[32], activation=name, init="xavier"), DIGITS),
                  CNN(CNNConfig(channels=[4], hidden=[16], activation=name, init="xavier"),
                      DataMeta(input_shape=(1, 8, 8), num_classes=10))):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        first = model((x, y)).loss.item()
        for _ in range(30):
            opt.zero_grad()
            model((x, y)).loss.backward()
            opt.step()
        assert model((x, y)).loss.item() < 0.95 * first, f"{name} did not learn in {type(model).__name__}"


def test_inits_by_name_have_their_statistics():
    torch.manual_seed(0)
    fan_out, fan_in = 256, 512
    w = torch.empty(fan_out, fan_in)
    init_weight(w, "zeros")
    assert bool((w == 0).all())
    init_weight(w, "normal")
    assert w.std().item() == pytest.approx(0.01, rel=0.05)
    init_weight(w, "uniform")
    assert w.abs().max().item() <= 0.05 and w.std().item() == pytest.approx(0.05 / math.sqrt(3), rel=0.05)
    init_weight(w, "xavier")
    assert w.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    init_weight(w, "kaiming")
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    init_weight(w, "lecun")
    assert w.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.05)
    init_weight(w, "orthogonal")
    assert torch.allclose(w @ w.T, torch.eye(fan_out), atol=1e-4)
    conv = torch.empty(16, 8, 3, 3)
    init_weight(conv, "lecun")  # fan-in of a conv kernel counts its window
    assert conv.std().item() == pytest.approx(1 / math.sqrt(8 * 9), rel=0.1)
    with pytest.raises(ConfigError, match="model.init"):
        init_weight(w, "he")
    assert set(INITS) >= {"zeros", "normal", "uniform", "xavier", "kaiming", "orthogonal", "lecun"}


def test_recurrent_init_is_orthogonal_per_gate_and_lstm_forget_bias_is_set():
    meta = DataMeta(input_shape=(10, 2), output_dim=1, task="regression")
    lstm = Recurrent(LSTMConfig(hidden_size=8, init="xavier", recurrent_init="orthogonal", forget_bias=1.0), meta)
    w_hh = lstm.rnn.weight_hh_l0.detach()
    for gate in w_hh.split(8):
        assert torch.allclose(gate @ gate.T, torch.eye(8), atol=1e-5)
    assert torch.equal(lstm.rnn.bias_ih_l0[8:16].detach(), torch.ones(8))
    assert float(lstm.rnn.bias_ih_l0[:8].detach().abs().sum() + lstm.rnn.bias_hh_l0.detach().abs().sum()) == 0.0
    rnn = Recurrent(RNNConfig(hidden_size=8, init="zeros", recurrent_init="orthogonal"), meta)
    assert bool((rnn.rnn.weight_ih_l0 == 0).all()) and bool((rnn.head.weight == 0).all())
    w = rnn.rnn.weight_hh_l0.detach()
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(INITS) - {"default"}))
def test_every_init_builds_every_catalog_model_that_takes_one(name):
    metas = {"cnn": DataMeta(input_shape=(1, 8, 8), num_classes=10),
             "rnn": DataMeta(input_shape=(12, 1), output_dim=1, task="regression"),
             "lstm": DataMeta(input_shape=(12, 1), output_dim=1, task="regression")}
    for model_name in ("perceptron", "mlp", "cnn", "rnn", "lstm"):
        cfg_cls, model_cls, _ = MODELS[model_name]
        model = model_cls(cfg_cls(init=name), metas.get(model_name, DIGITS))
        # hidden-to-hidden weights follow model.recurrent_init instead
        weights = [p for n, p in model.named_parameters() if "weight" in n and "weight_hh" not in n]
        assert weights and all(bool(torch.isfinite(p).all()) for p in weights)
        assert all(bool((p == 0).all()) == (name == "zeros") for p in weights), (model_name, name)


def _train_full_batch(model: nn.Module, x, y, steps: int = 150) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model((x, y)).loss.backward()
        opt.step()
    return model((x, y)).metrics["acc"].item()


def test_zero_init_keeps_hidden_units_identical_and_fails_to_learn():
    x, y = _digits()
    torch.manual_seed(0)
    zero = MLP(MLPConfig(hidden=[32], activation="sigmoid", init="zeros"), DIGITS)
    acc_zero = _train_full_batch(zero, x, y)
    hidden = zero.net[1].weight.detach()
    assert hidden.abs().sum() > 0, "the weights did move"
    assert torch.allclose(hidden, hidden[:1].expand_as(hidden)), "zero init: every hidden unit stayed identical"
    assert torch.allclose(zero.net[1].bias, zero.net[1].bias[:1].expand(32))
    torch.manual_seed(0)
    acc_xavier = _train_full_batch(MLP(MLPConfig(hidden=[32], activation="sigmoid", init="xavier"), DIGITS), x, y)
    print(f"zero init train acc {acc_zero:.3f}, xavier {acc_xavier:.3f}")
    # 32 identical units act as one: a single sigmoid unit cannot separate 10 digits.
    assert acc_zero < 0.5 and acc_xavier > 0.95


def test_dropout_is_active_in_training_only():
    model = MLP(MLPConfig(hidden=[64], dropout=0.5), DIGITS)
    x = _digits(32)[0]
    model.train()
    assert not torch.equal(model.predict(x), model.predict(x))
    model.eval()
    assert torch.equal(model.predict(x), model.predict(x))


def test_models_reject_inputs_of_the_wrong_shape():
    with pytest.raises(ConfigError, match="image=true"):
        CNN(CNNConfig(), DIGITS)
    with pytest.raises(ConfigError, match="seq_len, channels"):
        Recurrent(LSTMConfig(), DataMeta(input_shape=(1, 8, 8), num_classes=10))
    with pytest.raises(ConfigError, match="model.nonlinearity"):
        RNNConfig(nonlinearity="sigmoid")
    with pytest.raises(ConfigError, match="model.pool"):
        CNNConfig(pool="median")


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_the_metrics_the_driver_reads_off_the_meta_device_are_those_a_real_step_reports(job):
    """The driver names what a run logs (for early stopping's monitor and tune.metric) from a step of the catalog
    model on the meta device: for every shipped job, the names a real step on real samples reports."""
    from dtrain.config import load_job, to_objects
    from dtrain.data import load_data
    from dtrain.models import build_model, step_metrics

    obj = to_objects(load_job(JOBS / job))
    data = load_data(obj.data)
    batch = tuple(t[:2] for t in data.train)
    with torch.no_grad():
        real = list(build_model(obj.model, data.meta)(batch).metrics)
    assert step_metrics(obj.model, data.meta, batch) == real and "loss" in real
