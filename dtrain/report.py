"""`dtrain report RUN_DIR`: PNG plots (loss, metrics, lr, grad norm over steps) and report.md from metrics.jsonl.

For people without W&B: everything comes from the run directory. Figures are drawn with matplotlib's Figure API
(the Agg canvas, no pyplot and no display), so this works on headless machines and inside other programs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from dtrain import storage
from dtrain.errors import DataError
from dtrain.tracking import CONFIG_FILE, read_metrics

REPORT_DIR = "report"
REPORT_FILE = "report.md"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path | str:
    """Write the plots and report.md for run_dir (into run_dir/report by default); returns report.md's path.
    A run in object storage (a URI) is read from there, and its report/ is written there unless out_dir is given."""
    if storage.is_uri(run_dir):
        return _remote_report(str(run_dir), out_dir)
    run_dir = Path(run_dir)
    try:
        events = read_metrics(run_dir)
    except json.JSONDecodeError as err:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: not JSON lines ({err})") from None
    if not events:
        raise DataError(f"{run_dir}: no metrics.jsonl with events; `dtrain report` takes a run directory "
                        "(runs/<name>)")
    out = Path(out_dir) if out_dir else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    steps, epochs = _by_step(events, "step"), _by_step(events, "epoch")
    plots = [name for name, ok in (("loss", _plot_loss(steps, epochs, out / "loss.png")),
                                   ("metrics", _plot_metrics(epochs, out / "metrics.png")),
                                   ("lr", _plot_series(steps, epochs, "lr", "learning rate", out / "lr.png")),
                                   ("grad_norm", _plot_series(steps, epochs, "train/grad_norm", "gradient norm",
                                                              out / "grad_norm.png")),
                                   ("time_split", _plot_time_split(steps, epochs, out / "time_split.png")),
                                   ("system", _plot_system(steps, epochs, out / "system.png"))) if ok]
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    path = out / REPORT_FILE
    job = _job(run_dir)
    path.write_text(_markdown(run_dir, job, end, epochs, plots) + _profile_section(run_dir)
                    + _cost_section(run_dir, job))
    return path


def _cost_section(run_dir: Path, job: dict[str, Any]) -> str:
    """Worker-hours (CPU, GPU) and money of every segment of the run, from its cost.jsonl."""
    from dtrain.launch.cost import run_cost

    found = run_cost(run_dir, job.get("cost"))
    if found is None:
        return ""
    priced = f"| cost | {found['cost']:.4f} |\n" if "cost" in found else ""
    return ("\n## Cost\n\n| measure | value |\n|---|---|\n"
            f"| GPU-hours | {found['gpu_hours']:.4f} |\n| CPU-hours | {found['cpu_hours']:.4f} |\n"
            f"| worker-hours | {found['worker_hours']:.4f} |\n{priced}"
            f"| worker-group time | {found['seconds']:.1f} s in {found['segments']} segment(s) |\n")


def _remote_report(uri: str, out_dir: str | Path | None) -> Path | str:
    """The report of a run in object storage: its files read into a temporary folder, the report written there
    and copied back to <uri>/report (or written to out_dir)."""
    store = storage.RunStore(uri, key="run_dir")
    with tempfile.TemporaryDirectory(prefix="dtrain-report-") as tmp:
        local = store.download("", Path(tmp) / storage.split(uri)[1], top_only=True)
        store.download("profile", local / "profile")
        if out_dir is not None:
            return write_report(local, out_dir)
        path = write_report(local)
        store.upload(path.parent, REPORT_DIR)
    return f"{uri.rstrip('/')}/{REPORT_DIR}/{REPORT_FILE}"


def _profile_section(run_dir: Path, top: int = 15) -> str:
    """The top operators by self time of each profiled rank (trainer.profile), from profile/rank<r>.ops.json."""
    lines = []
    for path in sorted((run_dir / "profile").glob("rank*.ops.json")):
        found = json.loads(path.read_text())
        rank = path.name.split(".")[0].removeprefix("rank")
        lines += [f"## Profile: top operators by self time (rank {rank}, {found['steps']} steps)", "",
                  f"Trace: profile/rank{rank}.pt.trace.json (open in Perfetto)", "",
                  "| operator | calls | self CPU ms | self device ms | CPU total ms |", "|---|---|---|---|---|"]
        lines += [f"| `{op['name']}` | {op['calls']} | {op['self_cpu_us'] / 1e3:.3f} | "
                  f"{op['self_device_us'] / 1e3:.3f} | {op['cpu_us'] / 1e3:.3f} |" for op in found["ops"][:top]]
        lines.append("")
    return "\n".join(["", *lines]) if lines else ""


def _by_step(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Events of one kind, one per global step (the latest wins: a resumed run re-logs steps after its checkpoint)."""
    rows = {e["step"]: e for e in events if e.get("event") == kind and isinstance(e.get("step"), int)}
    return [rows[s] for s in sorted(rows)]


def _job(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml

    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(title: str, ylabel: str, n: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6 * n), dpi=100, layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    return fig, axes


def _mark_stages(ax, epochs: list[dict[str, Any]]) -> None:
    """A dashed line where a staged model (DBN, pretrained autoencoder) moves to its next stage."""
    for prev, row in zip(epochs, epochs[1:], strict=False):
        if prev.get("stage") != row.get("stage"):
            ax.axvline(prev["step"], color="grey", linestyle="--", linewidth=0.8)
            ax.text(prev["step"], 1, f" {row.get('stage')}", transform=ax.get_xaxis_transform(), fontsize=8,
                    va="top", color="grey")


def _save(fig, axes, epochs: list[dict[str, Any]], path: Path) -> bool:
    for ax in axes:
        _mark_stages(ax, epochs)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def _plot_loss(steps: list[dict[str, Any]], epochs: list[dict[str, Any]], path: Path) -> bool:
    curves = [(steps, "train/loss", "train (step)", {"alpha": 0.5, "linewidth": 1}),
              (epochs, "train/loss", "train (epoch mean)", {"marker": "o"}),
              (epochs, "val/loss", "validation", {"marker": "s"})]
    curves = [(*_series(rows, key), label, style) for rows, key, label, style in curves]
    if not any(xs for xs, *_ in curves):
        return False
    fig, axes = _figure("Loss", "loss")
    for xs, ys, label, style in curves:
        if xs:
            axes[0].plot(xs, ys, label=label, **style)
    return _save(fig, axes, epochs, path)


def _plot_metrics(epochs: list[dict[str, Any]], path: Path) -> bool:
    """One panel per metric other than loss (acc, mse, ...), train and validation per epoch."""
    names = sorted({k.split("/", 1)[1] for r in epochs for k in r
                    if k.startswith(("train/", "val/")) and k.split("/", 1)[1] not in ("loss", "grad_norm")})
    if not names:
        return False
    fig, axes = _figure("Metrics per epoch", "", len(names))
    for ax, name in zip(axes, names, strict=True):
        ax.set_ylabel(name)
        for split, marker in (("train", "o"), ("val", "s")):
            xs, ys = _series(epochs, f"{split}/{name}")
            if xs:
                ax.plot(xs, ys, marker=marker, label="validation" if split == "val" else split)
    return _save(fig, axes, epochs, path)


def _plot_series(steps: list[dict[str, Any]], epochs: list[dict[str, Any]], key: str, label: str,
                 path: Path) -> bool:
    xs, ys = _series(steps, key)
    if not xs:
        return False
    fig, axes = _figure(label.capitalize(), label)
    axes[0].plot(xs, ys, marker="." if len(xs) < 50 else None)
    return _save(fig, axes, epochs, path)


def _plot_time_split(steps: list[dict[str, Any]], epochs: list[dict[str, Any]], path: Path) -> bool:
    """Where each step's time goes (host clocks, mean over ranks): data wait, forward/backward, optimizer, other."""
    phases = [k for k in ("time/data_s", "time/forward_backward_s", "time/optimizer_s", "time/other_s")
              if _series(steps, k)[0]]
    if not phases:
        return False
    fig, axes = _figure("Time per step by phase (host clocks, mean over workers)", "seconds per step")
    xs = _series(steps, phases[0])[0]
    rows = {r["step"]: r for r in steps}
    axes[0].stackplot(xs, *[[rows[x].get(k, 0.0) for x in xs] for k in phases],
                      labels=[k.removeprefix("time/").removesuffix("_s").replace("_", "/") for k in phases])
    return _save(fig, axes, epochs, path)


def _plot_system(steps: list[dict[str, Any]], epochs: list[dict[str, Any]], path: Path) -> bool:
    """One panel per system metric (CPU %, memory, GPU), one line per worker."""
    keys = sorted({k for r in steps for k in r if k.startswith("sys/")})
    names = sorted({k.split("/")[1] for k in keys})
    if not names:
        return False
    fig, axes = _figure("System metrics per worker", "", len(names))
    for ax, name in zip(axes, names, strict=True):
        ax.set_ylabel(name)
        for key in (k for k in keys if k.split("/")[1] == name):
            ax.plot(*_series(steps, key), label=key.rsplit("/", 1)[-1])
    return _save(fig, axes, epochs, path)


def _table(values: dict[str, Any]) -> list[str]:
    rows = [(k, v) for k, v in values.items() if isinstance(v, int | float | str) and k != "time"]
    if not rows:
        return ["(none)", ""]
    return ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows), ""]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(run_dir: Path, job: dict[str, Any], end: dict[str, Any] | None, epochs: list[dict[str, Any]],
              plots: list[str]) -> str:
    model, data, trainer = job.get("model") or {}, job.get("data") or {}, job.get("trainer") or {}
    lines = [f"# dtrain run `{job.get('name') or run_dir.name}`", ""]
    if job:
        target = f" ({model['target']})" if model.get("target") else ""  # the module adapter's network
        lines += [f"- model: {model.get('name')}{target}, data: {data.get('name')}, "
                  f"strategy: {trainer.get('strategy')}, precision: {trainer.get('precision')}", ""]
    if end is None:
        lines += ["**The run did not finish** (no end event in metrics.jsonl); figures show what was logged.", ""]
    else:
        last_epoch = epochs[-1].get("epoch") if epochs else 0
        lines += [f"- status: {end.get('stop_reason')}; {last_epoch} epochs in the last stage, "
                  f"{end.get('steps')} optimizer steps, {end.get('world_size')} workers",
                  f"- wall time: {end.get('wall_time_s', 0):.1f} s, "
                  f"throughput: {end.get('train_samples_per_s', 0):.0f} samples/s", "",
                  "## Final test metrics", "", *_table(end.get("test") or {})]
        best = end.get("best") or {}
        if best:
            lines += [f"## Best epoch (by {best.get('monitor')})", "",
                      *_table({k: v for k, v in best.items() if k != "monitor"})]
    if epochs:
        lines += ["## Last epoch", "", *_table({k: v for k, v in epochs[-1].items() if k != "event"})]
    lines += ["## Plots", ""] + [f"![{name}]({name}.png)" for name in plots]
    return "\n".join(lines) + "\n"
