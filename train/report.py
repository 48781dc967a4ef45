"""A sweep's results as one table and one figure (`hdistill sweep-report RUN`, also written when a sweep ends).

sweep-report.csv / .md   one row per member: its overrides, its state, the final training loss, and per held-out
                         term (val/loss, val/loss/<target>) the final and the best value with its step
sweep-report.png         val/loss against the step, one line per member
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from hdistill.common.errors import HdistillError

from .run import METRICS
from .sweep import RECORD


def member_rows(run: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(table rows, {member: its held-out records}) from RUN/sweep.json and each RUN/<member>/metrics.jsonl."""
    path = run / RECORD
    if not path.exists():
        raise HdistillError(f"{run}: no {RECORD}; give the --out of a `hdistill train --sweep` run")
    record = json.loads(path.read_text())
    rows, curves = [], {}
    for member in record["members"]:
        name = member["name"]
        metrics = run / name / METRICS
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val/loss" in r]
        status = member["status"]
        row = {"member": name,
               "overrides": "; ".join(f"{k}={json.dumps(v)}" for k, v in member["overrides"].items()) or "(shared)",
               "state": status["state"] + (f" at step {status['step']}" if status["state"] == "stopped" else ""),
               "step": train[-1]["step"] if train else 0,
               "train loss": train[-1]["loss"] if train else None}
        for key in sorted({k for r in val for k in r if k.startswith("val/")}, key=lambda k: (k != "val/loss", k)):
            values = [(r[key], r["step"]) for r in val if key in r]
            best = min(values)
            row[f"final {key}"], row[f"best {key}"], row[f"best {key} step"] = values[-1][0], best[0], best[1]
        rows.append(row)
        curves[name] = val
    return rows, curves


def _cell(value) -> str:
    return "" if value is None else f"{value:.5g}" if isinstance(value, float) else str(value)


def write_report(run) -> list[Path]:
    run = Path(run)
    rows, curves = member_rows(run)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(run / "sweep-report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    (run / "sweep-report.md").write_text("\n".join(lines) + "\n")
    return [run / "sweep-report.csv", run / "sweep-report.md", plot_curves(curves, run / "sweep-report.png")]


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in curves.items():
        if records:
            ax.plot([r["step"] for r in records], [r["val/loss"] for r in records], marker="o", markersize=3,
                    label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (val/loss)")
    ax.set_title("sweep members")
    if any(curves.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
