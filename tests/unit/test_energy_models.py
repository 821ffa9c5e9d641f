"""RBM, DBN, deep autoencoder and SOM: their losses give the classic updates, and stages freeze the right weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from minisom import MiniSom
from omegaconf import OmegaConf

from dtrain.config import build_job, to_objects
from dtrain.data import load_data
from dtrain.errors import ConfigError
from dtrain.models import DataMeta, Stage, build_model
from dtrain.models.autoencoder import DeepAutoencoder, DeepAutoencoderConfig
from dtrain.models.dbn import DBN, DBNConfig
from dtrain.models.rbm import RBMLayer
from dtrain.models.som import SOM, SOMConfig


def _rbm(visible: str, hidden: str, n_v: int = 6, n_h: int = 4) -> RBMLayer:
    torch.manual_seed(0)
    rbm = RBMLayer(n_v, n_h, visible, hidden, "normal")
    with torch.no_grad():  # non-trivial parameters so every term of the update matters
        rbm.linear.weight.normal_(0, 0.5)
        rbm.linear.bias.normal_(0, 0.5)
        rbm.v_bias.normal_(0, 0.5)
    return rbm


def test_free_energy_matches_brute_force_sum_over_hidden_states():
    rbm = _rbm("bernoulli", "bernoulli", n_v=3, n_h=2)
    v = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    W, c, b = rbm.linear.weight, rbm.linear.bias, rbm.v_bias
    for i in range(len(v)):
        terms = [torch.exp(v[i] @ b + h @ c + h @ W @ v[i])
                 for h in (torch.tensor(s, dtype=torch.float32) for s in itertools.product([0, 1], repeat=2))]
        assert rbm.free_energy(v[i:i + 1]).item() == pytest.approx(-math.log(sum(terms).item()), abs=1e-5)


@pytest.mark.parametrize("visible,hidden", [("bernoulli", "bernoulli"), ("gaussian", "bernoulli"),
                                            ("bernoulli", "gaussian")])
@pytest.mark.parametrize("k", [1, 3])
def test_free_energy_loss_gradient_is_the_cd_k_update(visible, hidden, k):
    rbm = _rbm(visible, hidden)
    torch.manual_seed(1)
    v0 = torch.bernoulli(torch.full((8, 6), 0.5)) if visible == "bernoulli" else torch.randn(8, 6)
    torch.manual_seed(2)
    out = rbm.cd_step(v0, k)
    out.loss.backward()
    torch.manual_seed(2)  # the same Gibbs chain, replayed by hand
    vk = v0.clone()
    with torch.no_grad():
        for _ in range(k):
            pre = rbm.linear(vk)
            mean_h = torch.sigmoid(pre) if hidden == "bernoulli" else pre
            h = torch.bernoulli(mean_h) if hidden == "bernoulli" else mean_h + torch.randn_like(mean_h)
            pre_v = h @ rbm.linear.weight + rbm.v_bias
            vk = torch.sigmoid(pre_v) if visible == "bernoulli" else pre_v
        ph0, phk = rbm.hidden_mean(v0), rbm.hidden_mean(vk)
    n = len(v0)
    # CD-k ascends <v h>_data - <v h>_model; the loss gradient is its negative.
    torch.testing.assert_close(rbm.linear.weight.grad, -(ph0.t() @ v0 - phk.t() @ vk) / n)
    torch.testing.assert_close(rbm.linear.bias.grad, -(ph0 - phk).mean(0))
    torch.testing.assert_close(rbm.v_bias.grad, -(v0 - vk).mean(0))
    assert set(out.metrics) == {"loss", "recon_error", "free_energy"}


def _meta(n: int = 64, classes: int = 10) -> DataMeta:
    return DataMeta(input_shape=(n,), num_classes=classes)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_dbn_stages_train_one_rbm_at_a_time_then_the_whole_classifier():
    model = DBN(DBNConfig(hidden=[16, 8], pretrain_epochs=2, finetune_epochs=3, pretrain_lr=0.05), _meta())
    stages = model.stages()
    assert [(s.name, s.max_epochs, s.lr) for s in stages] == [("rbm0", 2, 0.05), ("rbm1", 2, 0.05),
                                                             ("finetune", 3, None)]
    x, y = torch.rand(5, 64), torch.randint(0, 10, (5,))
    for stage, expected in zip(stages, [{"rbms.0.linear.weight", "rbms.0.linear.bias", "rbms.0.v_bias"},
                                        {"rbms.1.linear.weight", "rbms.1.linear.bias", "rbms.1.v_bias"},
                                        {"rbms.0.linear.weight", "rbms.0.linear.bias", "rbms.1.linear.weight",
                                         "rbms.1.linear.bias", "head.weight", "head.bias"}], strict=True):
        model.set_stage(stage)
        assert _trainable(model) == expected
        model.zero_grad(set_to_none=True)
        model((x, y)).loss.backward()
        # Every trainable parameter gets a gradient (DDP needs that) and nothing frozen does.
        assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    assert "acc" in model((x, y)).metrics


def test_deep_autoencoder_unrolls_pretrained_rbms_into_the_decoder():
    cfg = DeepAutoencoderConfig(layers=[16, 4], pretrain=True)
    model = DeepAutoencoder(cfg, _meta())
    assert [s.name for s in model.stages()] == ["rbm0", "rbm1", "finetune"]
    assert (model.rbms[0].visible, model.rbms[0].hidden, model.rbms[1].hidden) == ("bernoulli", "bernoulli",
                                                                                  "gaussian")
    model.set_stage(Stage("rbm1"))
    assert _trainable(model) == {"rbms.1.linear.weight", "rbms.1.linear.bias", "rbms.1.v_bias"}
    model.set_stage(Stage("finetune"))
    torch.testing.assert_close(model.decoder[0].weight, model.rbms[1].linear.weight.t())
    torch.testing.assert_close(model.decoder[1].bias, model.rbms[0].v_bias)
    assert "rbms.0.v_bias" not in _trainable(model) and "decoder.1.weight" in _trainable(model)
    out = model((torch.rand(3, 64),))
    assert set(out.metrics) == {"loss", "mse", "sq_error"} and model.predict(torch.rand(3, 64)).shape == (3, 64)
    with pytest.raises(ConfigError, match="model.activation"):
        DeepAutoencoderConfig(layers=[16, 4], pretrain=True, activation="relu")


def test_autoencoder_mirrors_its_encoder_and_picks_activations_by_name():
    job = build_job(OmegaConf.create({"model": {"name": "autoencoder", "hidden": [32], "code": 3,
                                                "activation": "tanh", "output_activation": "sigmoid"}}))
    model = build_model(to_objects(job).model, _meta())
    assert model.encode(torch.rand(2, 64)).shape == (2, 3)
    assert [type(m).__name__ for m in model.decoder] == ["Linear", "Tanh", "Linear", "Sigmoid"]


def _som_pair(rows=3, cols=4, dim=5, sigma=1.3, decay_steps=50, t=7):
    cfg = SOMConfig(rows=rows, cols=cols, sigma=sigma, decay_steps=decay_steps)
    torch.manual_seed(0)
    som = SOM(cfg, _meta(dim))
    with torch.no_grad():
        som.weight.normal_()
        som.steps.fill_(t)
    mini = MiniSom(rows, cols, dim, sigma=sigma, learning_rate=0.4)
    mini._weights = som.weight.detach().double().numpy().reshape(rows, cols, dim).copy()
    return som, mini


def test_som_sgd_step_is_minisoms_classic_update():
    som, mini = _som_pair()
    x = torch.randn(1, 5)
    som((x,)).loss.backward()
    torch.optim.SGD(som.parameters(), lr=0.4).step()
    xn = x[0].double().numpy()
    mini.update(xn, mini.winner(xn), 7, 50)
    np.testing.assert_allclose(som.weight.detach().numpy().reshape(3, 4, 5), mini._weights, rtol=1e-5, atol=1e-5)
    assert int(som.steps) == 8  # the decay clock advanced


def test_som_metrics_match_minisom_quantization_and_topographic_error():
    som, mini = _som_pair()
    x = torch.randn(200, 5)
    som.eval()
    with torch.no_grad():
        m = som((x,)).metrics
    xn = x.double().numpy()
    assert m["quant_error"].item() == pytest.approx(mini.quantization_error(xn), rel=1e-5)
    assert m["topo_error"].item() == pytest.approx(mini.topographic_error(xn), abs=1e-6)
    assert int(som.steps) == 7  # evaluation does not advance the decay


def test_som_batch_update_moves_units_to_the_neighbourhood_weighted_mean():
    som, _ = _som_pair(decay_steps=0)
    som.cfg.update = "batch"
    x = torch.randn(40, 5)
    with torch.no_grad():
        bmu = som.predict(x)
        h = torch.exp(-som.grid_d2[bmu] / (2 * 1.3**2))
    som((x,)).loss.backward()
    torch.optim.SGD(som.parameters(), lr=1.0).step()
    torch.testing.assert_close(som.weight.detach(), (h.t() @ x) / h.sum(0)[:, None])


def test_minmax_scales_training_features_to_unit_interval_and_needs_standardize_off():
    with pytest.raises(ConfigError, match="data.minmax"):
        build_job(OmegaConf.create({"model": {"name": "rbm"}, "data": {"minmax": True}}))
    job = to_objects(build_job(OmegaConf.create({"model": {"name": "rbm"},
                                                 "data": {"minmax": True, "standardize": False}})))
    data = load_data(job.data)
    train = data.train[0]
    assert float(train.min()) == 0.0 and float(train.max()) == 1.0
    assert float(data.test[0].min()) >= 0.0 and float(data.test[0].max()) <= 1.0
    assert (train.amax(0) - train.amin(0)).max() == 1.0


def test_energy_model_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.cd_k"):
        build_job(OmegaConf.create({"model": {"name": "rbm", "cd_k": 0}}))
    with pytest.raises(ConfigError, match="model.update"):
        build_job(OmegaConf.create({"model": {"name": "som", "update": "sometimes"}}))
    with pytest.raises(ConfigError, match="model.visible"):
        build_job(OmegaConf.create({"model": {"name": "dbn", "visible": "poisson"}}))
    with pytest.raises(ConfigError, match="classification"):
        DBN(DBNConfig(), DataMeta(input_shape=(4,), task="unsupervised"))
