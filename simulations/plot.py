"""Figures drawn only from a results directory (metrics.json and the CSV files), never from a
live run: `python -m simulations plot DIR` writes PNGs into DIR/figures/."""

from __future__ import annotations

import csv
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(path: pathlib.Path) -> list[dict]:
    if not path.exists() or not path.read_text().strip():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _cdf(ax, values, label):
    v = sorted(values)
    if v:
        ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)


def plot_dir(d: str | pathlib.Path) -> list[pathlib.Path]:
    d = pathlib.Path(d)
    out = d / "figures"
    out.mkdir(exist_ok=True)
    written = []
    if (d / "sweep.csv").exists():
        rows = _rows(d / "sweep.csv")
        param = list(rows[0])[0]
        xs = [r[param] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, col in zip(axes, ("match_rate", "prop_p99_ms", "renter_loss_usd")):
            ax.plot(xs, [float(r[col] or 0) for r in rows], marker="o")
            ax.set_xlabel(param)
            ax.set_title(col)
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=110)
        plt.close(fig)
        return [out / "sweep.png"]
    m = json.loads((d / "metrics.json").read_text())
    title = f"{m['scenario']} (seed {m['seed']}, {m['nodes']} nodes)"

    fig, ax = plt.subplots(figsize=(6, 4))
    prop = [float(r["latency_ms"]) for r in _rows(d / "propagation.csv")]
    _cdf(ax, prop, "offer propagation")
    nr = [float(r["full_view_ms"]) for r in _rows(d / "new_renter.csv")]
    _cdf(ax, nr, "new renter: whole market")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("CDF")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "propagation_cdf.png", dpi=110)
    plt.close(fig)
    written.append(out / "propagation_cdf.png")

    series = _rows(d / "timeseries.csv")
    if series:
        t = [int(r["t_s"]) / 60 for r in series]
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot(t, [float(r["utilisation"]) for r in series], label="GPU utilisation")
        ax1.set_ylabel("utilisation")
        ax1.set_xlabel("simulated minutes")
        ax2 = ax1.twinx()
        ax2.plot(t, [int(r["online_nodes"]) for r in series], color="grey", ls="--", label="online nodes")
        ax2.plot(t, [int(r["open_escrows"]) for r in series], color="tab:green", label="open escrows")
        ax2.set_ylabel("count")
        fig.legend(loc="upper right")
        ax1.set_title(title)
        fig.tight_layout()
        fig.savefig(out / "timeseries.png", dpi=110)
        plt.close(fig)
        written.append(out / "timeseries.png")

    fails = m["negotiation_failures"]["renter"]
    bp = m["by_profile"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if fails:
        axes[0].barh(list(fails), list(fails.values()))
    axes[0].set_title("renter-side negotiation failures by reason")
    if bp:
        keys = list(bp)
        paid = [bp[k]["paid_provider"] / 1e6 for k in keys]
        value = [bp[k]["value_delivered"] / 1e6 for k in keys]
        y = range(len(keys))
        axes[1].barh([i - 0.2 for i in y], paid, height=0.4, label="paid to provider (USD)")
        axes[1].barh([i + 0.2 for i in y], value, height=0.4, label="value delivered (USD)")
        axes[1].set_yticks(list(y), keys)
        axes[1].legend()
    axes[1].set_title("money by provider->renter profile")
    fig.tight_layout()
    fig.savefig(out / "outcomes.png", dpi=110)
    plt.close(fig)
    written.append(out / "outcomes.png")

    rentals = _rows(d / "rentals.csv")
    if rentals:
        fig, ax = plt.subplots(figsize=(6, 4))
        models = sorted({r["model"] for r in rentals})
        ax.boxplot([[float(r["price_per_gpu_hour_usd"]) for r in rentals if r["model"] == mo] for mo in models])
        ax.set_xticks(range(1, len(models) + 1), [mo.replace("NVIDIA ", "").replace("GeForce ", "") for mo in models],
                      rotation=15)
        ax.set_ylabel("agreed USD per GPU-hour")
        ax.set_title("price dispersion by model")
        fig.tight_layout()
        fig.savefig(out / "prices.png", dpi=110)
        plt.close(fig)
        written.append(out / "prices.png")
    return written
