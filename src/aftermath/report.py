"""A run's report: RUN_DIR/report.html (self-contained: the plots are inlined as base64 PNGs) and the PNGs.

Reads what a coordinator (and the testnet's clients) left in the run directory:

    metrics/coordinator.jsonl   rounds (payload bytes, losses), checkpoints (validation per tier), events
    metrics/client-*.jsonl      per-client rounds (tokens/s), when the clients wrote there (the testnet does)
    summary.json                the final summary, when the run finished
    checkpoint/                 the last checkpoint (its config sizes the dense updates; text samples)

Plots (matplotlib): loss per tier, nested validation per tier, bandwidth per round, tokens/s per client.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aftermath.dashboard.history import DenseBytes, RunHistory
from aftermath.errors import ConfigError
from aftermath.metrics import read_metrics

REPORT_FILE = "report.html"
PLOTS = {"loss": "report-loss.png", "validation": "report-validation.png", "bandwidth": "report-bandwidth.png",
         "tokens": "report-tokens-per-s.png"}


@dataclass
class Report:
    html_path: Path
    pngs: dict[str, Path]
    history: RunHistory
    summary: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)


def _dense_bytes_function(run_dir: Path, history: RunHistory) -> Callable[[str], int | None]:
    """client id -> bytes of its update as dense fp32, from the checkpoint's config and the client's tier."""
    from aftermath.model import MatFormerConfig, tier_spec

    config_dir = run_dir / "checkpoint" / "model"
    if not (config_dir / "config.json").is_file():
        return lambda cid: None
    config = MatFormerConfig.load(config_dir)

    def spec_of(cid: str):
        tier = history.client_tier.get(cid, (None, ""))[0]
        return None if tier is None else tier_spec(config, tier)

    return DenseBytes(config, spec_of)


def load_history(run_dir: Path) -> RunHistory:
    coordinator = run_dir / "metrics" / "coordinator.jsonl"
    if not coordinator.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no metrics/coordinator.jsonl; give the --out "
                          f"directory of `aftermath testnet` or the --run-dir of `aftermath coordinator`")
    records = read_metrics(coordinator)
    history = RunHistory()
    history.dense_bytes_of = _dense_bytes_function(run_dir, history)
    return history.add_all(records)


def client_series(run_dir: Path) -> dict[str, dict[str, Any]]:
    """client id -> {"tier", "steps", "tokens_per_s"} from metrics/client-*.jsonl."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "metrics").glob("*.jsonl")):
        if path.name == "coordinator.jsonl":
            continue
        for rec in read_metrics(path):
            if rec.get("event") == "round" and rec.get("tokens_per_s") is not None:
                c = out.setdefault(rec.get("client_id") or path.stem, {"tier": rec.get("tier"), "steps": [],
                                                                        "tokens_per_s": []})
                c["steps"].append(rec["step"])
                c["tokens_per_s"].append(rec["tokens_per_s"])
    return out


# ------------------------------------------------------------------------------------------ plots
def _loss_axes(ax: Any, history: RunHistory, color: Callable[[str], str]) -> None:
    """Training loss per tier over steps, validation loss per tier at each checkpoint."""
    train, val = history.train_series(), history.val_series()
    for label, pts in train.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color(label), label=f"{label} train")
    for label, pts in val.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=color(label), label=f"{label} validation")
    if not train and not val:
        ax.text(0.5, 0.5, "no rounds recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss per tier")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(fontsize=8)


def plot_loss(run_dir: Path, path: Path) -> Path:
    """The loss plot of a run directory alone (the testnet's OUT/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors: dict[str, str] = {}
    _loss_axes(ax, load_history(run_dir), lambda label: colors.setdefault(label, f"C{len(colors) % 10}"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plots(run_dir: Path, history: RunHistory, clients: dict[str, dict[str, Any]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {k: run_dir / v for k, v in PLOTS.items()}
    colors: dict[str, str] = {}

    def color(label: str) -> str:
        if label not in colors:
            colors[label] = f"C{len(colors) % 10}"
        return colors[label]

    def save(fig, key: str) -> None:
        fig.tight_layout()
        fig.savefig(paths[key], dpi=100)
        plt.close(fig)

    def empty(ax, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _loss_axes(ax, history, color)
    save(fig, "loss")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in history.val_loss.items():
        ax.plot(range(len(points)), [p["loss"] for p in points], "o-", color=color(label), label=label)
    if history.val_loss:
        first = next(iter(history.val_loss.values()))
        ax.set_xticks(range(len(first)), [("initial" if p["epoch"] < 0 else f"epoch {p['epoch']}") + f"\nstep {p['step']}"
                                          for p in first], fontsize=8)
        ax.legend(fontsize=8)
    else:
        empty(ax, "no checkpoint evaluated")
    ax.set(ylabel="validation loss", title="Validation loss of the current model at every tier width (nested)")
    ax.grid(alpha=0.3)
    save(fig, "validation")

    fig, ax = plt.subplots(figsize=(8, 4))
    bw = history.bandwidth
    if bw:
        ax.bar([b["step"] for b in bw], [b["payload_bytes"] / 1e3 for b in bw], color="C0", label="payload kB")
        ratios = [(b["step"], b["ratio"]) for b in bw if b["ratio"]]
        if ratios:
            ax2 = ax.twinx()
            ax2.plot(*zip(*ratios), "o-", color="C3", label="x smaller than dense fp32")
            ax2.set_ylabel("compression ratio vs dense fp32", color="C3")
            ax2.set_ylim(bottom=0)
    else:
        empty(ax, "no rounds recorded")
    ax.set(xlabel="step", ylabel="kB of accepted payloads", title="Bandwidth per round")
    ax.grid(alpha=0.3, axis="y")
    save(fig, "bandwidth")

    fig, ax = plt.subplots(figsize=(8, 4))
    for cid, c in sorted(clients.items()):
        ax.plot(c["steps"], c["tokens_per_s"], ".-", label=f"{cid} (tier {c['tier']})")
    if clients:
        ax.legend(fontsize=8)
    else:
        empty(ax, "no client metrics in this run directory")
    ax.set(xlabel="step", ylabel="tokens/s (training)", title="Training speed per client")
    ax.grid(alpha=0.3)
    save(fig, "tokens")
    return paths


# ------------------------------------------------------------------------------------------ HTML
def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#1d232b;padding:0 16px}
h1{font-size:22px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
th,td{border-bottom:1px solid #e3e6ea;padding:4px 10px;text-align:left;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #e3e6ea}pre{background:#f6f7f9;padding:8px;white-space:pre-wrap}
.dim{color:#6b7580}code{font-size:12px}"""


def _html(run_dir: Path, rep: Report, clients: dict[str, dict[str, Any]]) -> str:
    s, h = rep.summary, rep.history
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Aftermath run report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Aftermath run report: {html.escape(str(s.get('run_id', run_dir.name)))}</h1>",
             f"<p class='dim'>{html.escape(str(run_dir))} · written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    steps = s.get("steps", max((b["step"] + 1 for b in h.bandwidth), default=0))
    total_payload = sum(b["payload_bytes"] for b in h.bandwidth)
    ratios = [b["ratio"] for b in h.bandwidth if b["ratio"]]
    parts.append(_table(["steps", "epochs", "replicas consistent", "wall seconds", "payload bytes (all rounds)",
                         "mean compression vs dense fp32"],
                        [[steps, s.get("epochs", "-"), s.get("replicas_consistent", "-"), s.get("wall_seconds", "-"),
                          total_payload, f"{sum(ratios) / len(ratios):.1f}x" if ratios else "-"]]))
    if s.get("clients"):
        parts.append("<h2>Clients</h2>")
        parts.append(_table(["id", "tier", "final loss", "tokens/s", "bytes up", "bytes down", "rounds",
                             "replica sha256"],
                            [[c.get("id"), c.get("tier"), _fmt(c.get("final_loss")), _fmt(c.get("tokens_per_s"), 1),
                              c.get("bytes_up"), c.get("bytes_down"), c.get("rounds_contributed", "-"),
                              (c.get("weights_sha256") or "-")[:16]] for c in s["clients"]]))
    titles = {"loss": "Loss per tier", "validation": "Nested validation per tier",
              "bandwidth": "Bandwidth per round", "tokens": "Tokens/s per client"}
    for key, path in rep.pngs.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{titles[key]}</h2><img alt='{titles[key]}' src='data:image/png;base64,{data}'>")
    if h.checkpoints:
        parts.append("<h2>Checkpoints</h2>")
        parts.append(_table(["epoch", "step", "validation loss per tier", "replica sha256 per tier", "write seconds"],
                            [["initial" if c["epoch"] < 0 else c["epoch"], c["step"],
                              " · ".join(f"{k} {v:.4f}" for k, v in c["val_loss"].items() if v is not None),
                              " · ".join(f"{k} {v[:12]}" for k, v in c["weights_sha256"].items()),
                              _fmt(c["seconds"], 2)] for c in h.checkpoints]))
    if rep.samples:
        parts.append("<h2>Samples from the last checkpoint</h2>")
        for name, text in rep.samples.items():
            parts.append(f"<p><b>{html.escape(name)}</b></p><pre>{html.escape(text)}</pre>")
    if h.events:
        parts.append("<h2>Events</h2>")
        parts.append(_table(["time", "event", "detail"],
                            [[time.strftime("%H:%M:%S", time.localtime(e["time"])) if e["time"] else "-", e["kind"],
                              json.dumps(e["detail"])[:200]] for e in h.events]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, *, samples: bool = True) -> Report:
    """Write RUN_DIR/report.html and the report PNGs; return where they are and what they show."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; give the --out directory of a testnet "
                          f"or the --run-dir of a coordinator")
    history = load_history(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    clients = client_series(run_dir)
    pngs = _plots(run_dir, history, clients)
    texts: dict[str, str] = {}
    model_dir = run_dir / "checkpoint" / "model"
    if samples and (model_dir / "config.json").is_file():
        from aftermath.dashboard.samples import sample_texts

        texts = sample_texts(model_dir)
    rep = Report(html_path=run_dir / REPORT_FILE, pngs=pngs, history=history, summary=summary, samples=texts)
    tmp = rep.html_path.with_suffix(".html.tmp")
    tmp.write_text(_html(run_dir, rep, clients))
    tmp.replace(rep.html_path)
    return rep
