"""The README's catalog table, made from runs of the shipped job files: `make catalog`
(`python -m benchmarks.catalog [--rows perceptron_breast_cancer,...]`).

Each row runs `dtrain train jobs/<file>` as a user would (the job's own worker count; an embedded Ray, or the head
`dtrain up` keeps), reads what the run reports (summary.json; the exported model.pt for the SOM's errors and the
adding problem's gradients), and fits the row's peer on the very split the run trained and tested on. A peer's
settings are chosen on that split's validation part from a small grid, then it is scored on the test part. The
figures go to benchmarks/results/catalog.json and the table to the README, between its catalog markers, so the
table is what the latest runs gave. tests/quality/test_catalog.py trains the same job files and asserts these
figures within each row's tolerance; tests/unit/test_docs.py asserts that the README's table is this file's
rendering of catalog.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
RESULT = ROOT / "benchmarks" / "results" / "catalog.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- catalog table: made by `make catalog`; do not edit -->", "<!-- end of catalog table -->"


@dataclass(frozen=True)
class Run:
    """A finished run of a row's job: its folder, summary and the data split it trained and tested on."""

    run_dir: Path
    summary: dict[str, Any]
    cfg: Any  # the job's config objects
    bundle: Any  # dtrain.data.DataBundle: the very split and scaling the workers used

    def arrays(self, split: str) -> tuple[np.ndarray, ...]:
        """(features flattened, targets) of a split as numpy."""
        x, y = getattr(self.bundle, split)[:2]
        return x.numpy().reshape(len(x), -1), y.numpy()

    def model(self) -> Any:
        """The model with the weights the run exported (those its test metrics are of)."""
        from dtrain.engine.checkpoint import safe_load
        from dtrain.models import build_model

        net = build_model(self.cfg.model, self.bundle.meta)
        net.load_state_dict(safe_load(self.run_dir / "model.pt"))
        return net.eval()


@dataclass(frozen=True)
class Factor:
    """A tolerance for a figure that moves by factors, not by amounts (a ratio of gradient sizes): a new run may land
    within [recorded / factor, recorded * factor]."""
    factor: float


def within(tolerance: float | Factor, got: float, recorded: float) -> bool:
    """Whether a new run's figure is within the tolerance of the recorded one."""
    if isinstance(tolerance, Factor):
        return recorded / tolerance.factor <= got <= recorded * tolerance.factor
    return abs(got - recorded) <= tolerance


@dataclass(frozen=True)
class Row:
    model: str
    job: str
    data: str
    measure: Callable[[Run], dict[str, float]]
    """The run's figures, by name (the first is the row's main figure)."""
    reached: str
    """The reached cell, formatted with the figures."""
    tolerance: dict[str, float | Factor]
    """How far a new run of the job may land from each figure (absolute, or a Factor): the quality test's bound."""
    better: str = "max"
    """Whether more (max) or less (min) of the main figure is better."""
    peer: Callable[[Run], dict[str, Any]] | None = None
    """The peer on the same split: {"name", "settings", and the same figures}; None: a reference instead."""
    reference: str = "—"
    """The peer cell when there is no peer: a baseline, or a target."""
    target: float | None = None
    """A figure the main one should reach, when there is no peer."""


def summary_metric(name: str) -> Callable[[Run], dict[str, float]]:
    def measure(run: Run) -> dict[str, float]:
        return {name.split("/")[-1]: float(run.summary["test"][name])}
    return measure


def _choose(grid: dict[str, list[Any]], score: Callable[..., float]) -> dict[str, Any]:
    """The grid point with the highest score (on the validation split); ties: the first."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return max(points, key=lambda p: score(**p))


def _quiet(fit: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's convergence warnings: the iterations match the job's
        return fit()


def perceptron_peer(run: Run) -> dict[str, Any]:
    from sklearn.linear_model import Perceptron

    (x, y), (xv, yv), (xt, yt) = run.arrays("train"), run.arrays("val"), run.arrays("test")
    epochs = run.cfg.trainer.max_epochs

    def fit(**p: Any) -> Any:
        return _quiet(lambda: Perceptron(max_iter=epochs, tol=None, random_state=0, **p).fit(x, y))

    best = _choose({"penalty": [None, "l2", "l1"], "alpha": [1e-4, 1e-3, 1e-2], "eta0": [0.01, 0.1, 1.0]},
                   lambda **p: fit(**p).score(xv, yv))
    return {"name": "scikit-learn Perceptron", "settings": {**best, "max_iter": epochs},
            "acc": float(fit(**best).score(xt, yt))}


def mlp_peer(run: Run) -> dict[str, Any]:
    from sklearn.neural_network import MLPClassifier

    (x, y), (xv, yv), (xt, yt) = run.arrays("train"), run.arrays("val"), run.arrays("test")
    m, d = run.cfg.model, run.cfg.data
    fixed = {"hidden_layer_sizes": tuple(m.hidden), "activation": m.activation, "solver": "adam",
             "batch_size": d.batch_size * run.cfg.trainer.num_workers, "max_iter": run.cfg.trainer.max_epochs,
             "random_state": 0}

    def fit(**p: Any) -> Any:
        return _quiet(lambda: MLPClassifier(**fixed, **p).fit(x, y))

    best = _choose({"learning_rate_init": [0.001, 0.002, 0.005], "alpha": [1e-4, 1e-3, 1e-2, 1e-1]},
                   lambda **p: fit(**p).score(xv, yv))
    settings = {**{k: v for k, v in fixed.items() if k != "random_state"}, **best}
    return {"name": "scikit-learn MLPClassifier", "settings": settings, "acc": float(fit(**best).score(xt, yt))}


def rbm_downstream(run: Run) -> dict[str, float]:
    """The run's own downstream score (trainer.linear_probe: a logistic regression on its features)."""
    return {"acc": float(run.summary["test"]["test/probe_acc"]),
            "recon_error": float(run.summary["test"]["test/recon_error"])}


def rbm_peer(run: Run) -> dict[str, Any]:
    """scikit-learn's BernoulliRBM at the job's width, epochs and batch, its learning rate chosen on validation,
    its features classified by the very probe the run uses (dtrain.launch.probe)."""
    from sklearn.neural_network import BernoulliRBM

    from dtrain.launch.probe import probe_accuracy

    splits = ("train", "val", "test")
    xs, labels = {s: run.arrays(s)[0] for s in splits}, {s: run.arrays(s)[1] for s in splits}
    fixed = {"n_components": run.cfg.model.hidden, "n_iter": run.cfg.trainer.max_epochs,
             "batch_size": run.cfg.data.batch_size * run.cfg.trainer.num_workers}
    scores = {}
    for lr in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        rbm = BernoulliRBM(learning_rate=lr, random_state=0, **fixed).fit(xs["train"])
        scores[lr] = probe_accuracy({s: rbm.transform(xs[s]) for s in splits}, labels)
    best = max(scores, key=lambda lr: scores[lr][0])
    _, acc, c = scores[best]
    return {"name": "scikit-learn BernoulliRBM + the same probe",
            "settings": {**fixed, "learning_rate": best, "C": c}, "acc": acc}


def _som_errors(weights: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(quantization error, topographic error) of a map's weights (rows, cols, features) on x, by MiniSom."""
    from minisom import MiniSom

    som = MiniSom(*weights.shape)
    som._weights = weights
    return float(som.quantization_error(x)), float(som.topographic_error(x))


def som_measure(run: Run) -> dict[str, float]:
    m = run.cfg.model
    weights = run.model().weight.detach().double().numpy().reshape(m.rows, m.cols, -1)
    qe, te = _som_errors(weights, run.arrays("test")[0].astype(np.float64))
    return {"quant_error": qe, "topo_error": te}


def som_peer(run: Run) -> dict[str, Any]:
    from minisom import MiniSom

    m = run.cfg.model
    x, xv, xt = (run.arrays(s)[0].astype(np.float64) for s in ("train", "val", "test"))
    iterations = run.cfg.trainer.max_epochs * len(x)  # as many sample presentations as the run's epochs

    def fit(learning_rate: float) -> np.ndarray:
        som = MiniSom(m.rows, m.cols, x.shape[1], sigma=m.sigma, learning_rate=learning_rate, random_seed=0)
        som.random_weights_init(x)
        som.train_random(x, iterations)
        return som.get_weights()

    best = _choose({"learning_rate": [0.02, 0.05, 0.1, 0.5, 1.0]},
                   lambda learning_rate: -_som_errors(fit(learning_rate), xv)[0])
    qe, te = _som_errors(fit(**best), xt)
    return {"name": "MiniSom", "settings": {"grid": f"{m.rows}x{m.cols}", "sigma": m.sigma, **best,
                                            "iterations": iterations}, "quant_error": qe, "topo_error": te}


def pca_peer(code: int) -> Callable[[Run], dict[str, Any]]:
    def peer(run: Run) -> dict[str, Any]:
        from sklearn.decomposition import PCA

        x, xt = run.arrays("train")[0], run.arrays("test")[0]
        pca = PCA(code, random_state=0).fit(x)
        return {"name": f"PCA({code})", "settings": {},
                "mse": float(((pca.inverse_transform(pca.transform(xt)) - xt) ** 2).mean())}
    return peer


def adding_measure(run: Run) -> dict[str, float]:
    """Test MSE, and how much of the first input's gradient reaches the output against the last's (near 0:
    vanished)."""
    net, x = run.model(), run.bundle.test[0][:500].clone().requires_grad_(True)
    net.predict(x).sum().backward()
    per_step = x.grad.abs().sum(dim=(0, 2))
    return {"mse": float(run.summary["test"]["test/mse"]), "grad_ratio": float(per_step[0] / per_step[-1])}


def adding_peer(run: Run) -> dict[str, Any]:
    y, yt = run.arrays("train")[1], run.arrays("test")[1]
    return {"name": "predict the mean", "settings": {}, "mse": float(np.mean((yt - y.mean()) ** 2))}


def persistence_peer(run: Run) -> dict[str, Any]:
    from dtrain.data.series import persistence_mse

    x, y = run.bundle.test
    return {"name": "persistence", "settings": {}, "mse": persistence_mse(x.numpy(), y.numpy())}


ACC = {"acc": 0.012}
ROWS = [
    Row("perceptron", "perceptron_breast_cancer.yaml", "breast cancer", summary_metric("test/acc"), "acc {acc:.3f}",
        ACC, peer=perceptron_peer),
    Row("perceptron", "perceptron_xor.yaml", "XOR", summary_metric("test/acc"),
        "acc {acc:.2f}: a linear model cannot fit XOR", {"acc": 0.1}, reference="chance 0.5"),
    Row("mlp", "mlp_xor.yaml", "XOR", summary_metric("test/acc"), "acc {acc:.3f}", {"acc": 0.0},
        reference="perfect 1.000"),
    Row("mlp", "mlp_digits_long.yaml", "digits", summary_metric("test/acc"), "acc {acc:.3f}", ACC, peer=mlp_peer),
    Row("mlp", "mlp_digits.yaml", "digits (`make train`)", summary_metric("test/acc"), "acc {acc:.3f}", ACC,
        reference="target 0.97", target=0.97),
    Row("cnn", "cnn_digits.yaml", "digits as 1x8x8 images", summary_metric("test/acc"), "acc {acc:.3f}", ACC,
        reference="target 0.985", target=0.985),
    Row("rnn", "rnn_adding.yaml", "adding problem, length 50", adding_measure,
        "MSE {mse:.3f}, the predict-the-mean baseline: gradients vanish (first/last input {grad_ratio:.0e})",
        {"mse": 0.01, "grad_ratio": 1e-3}, better="min", reference="predict the mean 1/6 = 0.167"),
    Row("lstm", "lstm_adding.yaml", "adding problem, length 50", adding_measure,
        "MSE {mse:.4f}: solved (first/last input {grad_ratio:.2f})", {"mse": 0.005, "grad_ratio": Factor(3.0)},
        better="min", peer=adding_peer),
    Row("lstm", "lstm_sunspots.yaml", "sunspots (statsmodels)", summary_metric("test/mse"), "MSE {mse:.3f}",
        {"mse": 0.006}, better="min", peer=persistence_peer),
    Row("rnn", "rnn_sunspots.yaml", "sunspots (statsmodels)", summary_metric("test/mse"), "MSE {mse:.3f}",
        {"mse": 0.006}, better="min", peer=persistence_peer),
    Row("autoencoder", "autoencoder_digits.yaml", "digits", summary_metric("test/mse"),
        "MSE/feature {mse:.3f} (code 8)", {"mse": 0.02}, better="min", peer=pca_peer(8)),
    Row("deep_autoencoder", "deep_autoencoder_digits.yaml", "digits in [0, 1]", summary_metric("test/mse"),
        "MSE/feature {mse:.4f} (code 4, RBM pre-trained)", {"mse": 0.003}, better="min", peer=pca_peer(4)),
    Row("rbm", "rbm_digits.yaml", "digits in [0, 1]", rbm_downstream, "features + logistic regression "
        "(`test/probe_acc`) {acc:.3f}",
        {"acc": 0.015, "recon_error": 0.5}, peer=rbm_peer),
    Row("dbn", "dbn_digits.yaml", "digits in [0, 1]", summary_metric("test/acc"), "acc {acc:.3f}", ACC,
        reference="target 0.97", target=0.97),
    Row("som", "som_digits.yaml", "digits", som_measure, "quantization {quant_error:.2f}, topographic "
        "{topo_error:.3f}", {"quant_error": 0.08, "topo_error": 0.03}, better="min", peer=som_peer),
]
BY_JOB = {row.job: row for row in ROWS}


def finished(run_dir: Path) -> Run:
    """A Run from a finished run's folder (its config.yaml says which split it trained on)."""
    from dtrain.config import load_job, to_objects
    from dtrain.data import load_data

    cfg = to_objects(load_job(run_dir / "config.yaml"))
    summary = json.loads((run_dir / "summary.json").read_text())
    return Run(run_dir, summary, cfg, load_data(cfg.data))


def run_job(row: Row, runs_dir: Path) -> Run:
    """`dtrain train jobs/<file>` as a user types it (W&B off: nothing to sync)."""
    name = row.job.removesuffix(".yaml")
    cmd = [str(Path(sys.executable).parent / "dtrain"), "train", str(JOBS / row.job), f"runs_dir={runs_dir}",
           f"name={name}", "logging.wandb.enabled=false", "logging.progress=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return finished(runs_dir / name)


def bar(row: Row, peer: dict[str, Any] | None, main: str) -> float | None:
    """What the main figure (named main) is compared with: the peer's, or the row's target; None: nothing."""
    return peer[main] if peer is not None else row.target


def verdict(row: Row, ours: dict[str, float], peer: dict[str, Any] | None) -> str:
    """Whether the run is ahead of its peer (or reaches its target) on the main figure; ties count as ahead."""
    key = next(iter(ours))
    against = bar(row, peer, key)
    if against is None:
        return ""
    return "ahead" if (ours[key] >= against if row.better == "max" else ours[key] <= against) else "behind"


def _number(value: Any) -> str:
    if isinstance(value, list | tuple):  # a tuple when fitted, a list once read back from catalog.json
        return f"({', '.join(map(_number, value))})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(results: dict[str, Any]) -> str:
    """The README's catalog table from catalog.json."""
    lines = ["| model | job file | data set | reached (test) | peer on the same split | |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        got = results["rows"][row.job]
        peer = got["peer"]
        if peer is None:
            peer_cell = row.reference
        else:
            key = next(iter(got["figures"]))
            settings = ", ".join(f"{k} {_number(v)}" for k, v in peer["settings"].items())
            peer_cell = f"{peer['name']}{f' ({settings})' if settings else ''}: {key} {peer[key]:.4g}"
        mark = {"ahead": "reached" if peer is None else "dtrain ahead",
                "behind": "**not reached**" if peer is None else "**dtrain behind**", "": ""}[got["verdict"]]
        lines.append(f"| {row.model} | `{row.job}` | {row.data} | {row.reached.format(**got['figures'])} | "
                     f"{peer_cell} | {mark} |")
    return "\n".join(lines)


def write_readme(results: dict[str, Any], readme: Path = README) -> None:
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated job files to rerun (default: every row)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the runs in a new folder in this one (default: a temp folder, removed)")
    args = parser.parse_args()
    from benchmarks.common import machine

    results = json.loads(RESULT.read_text()) if RESULT.exists() else {"rows": {}}
    chosen = [BY_JOB[j if j.endswith(".yaml") else f"{j}.yaml"] for j in args.rows.split(",") if j] or ROWS
    with tempfile.TemporaryDirectory(prefix="dtrain-catalog-") as tmp:
        runs_dir = (args.runs_dir or Path(tmp)) / time.strftime("%Y%m%d-%H%M%S")  # a new folder each time
        for row in chosen:
            started = time.monotonic()
            run = run_job(row, runs_dir)
            figures = row.measure(run)
            peer = row.peer(run) if row.peer else None
            results["rows"][row.job] = {"figures": figures, "peer": peer, "verdict": verdict(row, figures, peer),
                                        "workers": run.summary.get("world_size"), "epochs": run.summary["epochs"],
                                        "wall_s": round(time.monotonic() - started, 1)}
            print(f"[catalog] {row.job}: {figures} peer {peer} ({time.monotonic() - started:.0f} s)", flush=True)
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    complete = all(row.job in results["rows"] for row in ROWS)
    if complete:
        write_readme(results)
    print(f"[catalog] {RESULT}; README table {'written' if complete else 'not written: rows missing'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(main())
