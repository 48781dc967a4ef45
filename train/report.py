"""A sweep's results as one table and one figure (`hdistill sweep-report RUN`, also written when a sweep ends).

sweep-report.csv / .md   one row per member: its overrides, its state, the final training loss, and per held-out
                         term (val/loss, val/loss/<target>) the final and the best value with its step
sweep-report.png         one panel per held-out term (log scale) against the step, one line per member
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from hdistill.common.errors import HdistillError

from .checkpoint import METRICS, RECORD


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
    """One panel per held-out term (val/loss, then each val/loss/<target>), every member that has it as a line from
    its step-0 evaluation on, on a log scale: members whose objectives differ by orders of magnitude (a feature
    term of tenths, relations of tens) stay readable, and each term compares like with like."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for records in curves.values() for r in records for k in r if k.startswith("val/")},
                  key=lambda k: (k != "val/loss", k)) or ["val/loss"]
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (name, records) in enumerate(curves.items()):     # a member keeps its colour in every panel
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name, color=f"C{i % 10}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("held-out loss" if key == "val/loss" else key.removeprefix("val/loss/"), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if any(curves.values()):
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("sweep members: held-out loss per term (log scale)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
