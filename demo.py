"""`hdistill demo`: the whole flow on a built-in default, with no network and no files of the user's.

Generated images -> precompute (small MAE + CLIP-role teachers, the default compact store) -> train a small
student for a few hundred steps -> loss curve -> attention analysis of teachers and student.
Teachers carry random weights unless the user gives real ones (--weights ROLE=PATH, --model ROLE=NAME).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from hdistill.analyze import run_analysis, student_as_teacher
from hdistill.common.errors import HdistillError
from hdistill.precompute.config import PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.precompute.teachers import build_teachers
from hdistill.train.config import TrainConfig, TrainRuntime
from hdistill.train.run import run_train

# small stand-ins for the default ViT-B/16 teachers: same family and patch size, 6 blocks of width 96
TINY_TEACHER = ("vit_small_patch16_224", {"depth": 6, "embed_dim": 96, "num_heads": 3})
TINY_STUDENT = ("vit_small_patch16_224", {"depth": 6, "embed_dim": 96, "num_heads": 3})


def plot_losses(metrics: Path, out: Path, random_teachers: bool = False) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    terms = [k for k in records[0] if k.startswith("loss/")]
    for key in ["loss", *terms]:
        label = "total" if key == "loss" else f"{key[5:]} (SmoothL1)"
        ax.plot(steps, [r[key] for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("hdistill demo: student training" + ("\n(targets of RANDOM-weight teachers)" if random_teachers
                                                         else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_demo(out: str, models: dict[str, str] | None = None, model_args: dict | None = None,
             weights: dict[str, str] | None = None, images: int = 96, steps: int = 300, batch_size: int = 32,
             echo=print) -> dict[str, Path]:
    out_dir = Path(out)
    models, model_args, weights = dict(models or {}), dict(model_args or {}), dict(weights or {})
    roles = ["mae", "clip"]
    for role in roles:  # tiny stand-ins unless the user named a model or gave weights for the role
        if role not in models and role not in weights:
            models[role], model_args[role] = TINY_TEACHER[0], {**TINY_TEACHER[1], **model_args.get(role, {})}
    random_init = not weights
    if random_init:
        echo("demo: the teachers have RANDOM weights (no network here): the flow is real, the targets are not "
             "those of trained models. Give --weights ROLE=PATH for real teachers.")
    elif set(weights) != set(roles):
        missing = sorted(set(roles) - set(weights))
        raise HdistillError(f"--weights: give weights for every teacher role or none (missing: {', '.join(missing)})")

    pcfg = PrecomputeConfig(data=f"synthetic:{images}", teachers=roles, models=models, model_args=model_args,
                            weights=weights, random_init=random_init, views=2, batch_size=32, shard_size=32)
    echo(f"demo: 1/3 precompute {images} generated images x 2 views -> {out_dir / 'store'}")
    run_precompute(pcfg, str(out_dir / "store"), Runtime(device="cpu", workers=0, quiet=True))

    echo(f"demo: 2/3 train a {TINY_STUDENT[0]} {TINY_STUDENT[1]} student for {steps} steps -> {out_dir / 'run'}")
    # gcd(4, batch) lanes, not gcd(16, batch): a demo epoch is 6 batches from 3 shards per view, and every lane
    # opens every shard it takes samples from, so 16 lanes would parse each small shard 16 times an epoch (40% of
    # the step)
    batch = min(batch_size, images)
    tcfg = TrainConfig(shards=str(out_dir / "store"), student=TINY_STUDENT[0], student_args=TINY_STUDENT[1],
                       steps=steps, batch_size=batch, lr=1e-3, lanes=math.gcd(4, batch))
    student_file = run_train(tcfg, str(out_dir / "run"), TrainRuntime(device="cpu", workers=0, log_every=5,
                                                                      checkpoint_every=steps, quiet=True))
    loss_png = plot_losses(out_dir / "run" / "metrics.jsonl", out_dir / "loss.png", random_init)

    echo(f"demo: 3/3 analyze attention of teachers and student -> {out_dir / 'analysis'}")
    analysed = build_teachers(pcfg, "cpu")
    analysed["student"] = student_as_teacher(str(student_file))     # built as its file says
    files = run_analysis(analysed, "synthetic:8", 8, str(out_dir / "analysis"))
    return {"store": out_dir / "store", "run": out_dir / "run", "metrics": out_dir / "run" / "metrics.jsonl",
            "student": student_file, "loss_curve": loss_png, **{f.name: f for f in files}}
