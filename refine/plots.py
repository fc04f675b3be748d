"""PNG curves of a run's metrics.jsonl (reward, losses, entropy, staleness when present)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from refine.files import naming

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {
    "reward": ["reward_mean"],
    "losses": ["ntp_loss", "policy_loss", "eval_ntp_loss"],
    "entropy": ["entropy_selected"],
    "staleness": ["staleness"],
}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    rows = read_metrics(metrics_path)
    written = []
    for name, keys in CURVES.items():
        series = {k: [(r["step"], r[k]) for r in rows if k in r and "step" in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            # A series of few points (a held-out loss measured rarely) gets markers: one point is no line.
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key,
                    marker="o" if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        try:
            fig.savefig(path, dpi=100)
        except OSError as error:  # a full disk: the write names no file
            raise naming(error, path) from None
        finally:
            plt.close(fig)
        written.append(path)
    return written
