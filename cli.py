"""The `hdistill` command line. Composes precompute and the store tools; errors print without tracebacks."""
from __future__ import annotations

import ast
import os
import sys
import time
from pathlib import Path

import click

from hdistill import __version__
from hdistill.common.errors import HdistillError


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HdistillError as err:
            raise click.ClickException(str(err)) from None


def absolute_data(data: str) -> str:
    """--data as the store records it: a local path made absolute (inspect, --online and --fresh-views then find the
    images from any working directory); URLs, tar patterns' URLs and synthetic:N as given."""
    from hdistill.common.storage import is_url
    if is_url(data) or data.startswith("synthetic:"):
        return data
    return os.path.abspath(data)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _pairs(values, option: str) -> dict[str, str]:
    out = {}
    for value in values:
        role, sep, rest = value.partition("=")
        if not sep or not role or not rest:
            raise HdistillError(f"{option} {value!r}: expected ROLE=VALUE")
        out[role] = rest
    return out


def parse_value(text: str):
    """timm-style kwarg values: Python literals where they parse, strings otherwise."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_args(values) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for value in values:
        key, sep, text = value.partition("=")
        role, dot, name = key.partition(".")
        if not sep or not dot or not role or not name:
            raise HdistillError(f"--model-arg {value!r}: expected ROLE.KEY=VALUE, e.g. mae.depth=6")
        out.setdefault(role, {})[name] = parse_value(text)
    return out


def parse_weights(values, teachers: list[str]) -> dict[str, str]:
    if list(values) == ["hub"]:
        return {role: "hub" for role in teachers}
    return _pairs(values, "--weights")


def parse_ints(value: str | None, option: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in _split(value)]
    except ValueError:
        raise HdistillError(f"{option} {value!r}: expected comma-separated integers, e.g. -3,-2") from None


def resolve_device(device: str) -> str:
    """auto -> cuda if there is one, else cpu; a bare "cuda" is this process's GPU under torchrun
    (cuda:LOCAL_RANK), so the ranks of one machine do not all land on cuda:0."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise HdistillError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def available_cpus() -> int:
    """CPUs this process may use, shared among the ranks torchrun starts on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def loader_workers(requested: int | None, default: int = 4) -> int:
    """Decoding processes: the default never exceeds the CPUs available; a larger request is capped."""
    cpus = available_cpus()
    if requested is None:
        return min(default, cpus)
    if requested > cpus:
        click.echo(f"note: --workers {requested} capped at the {cpus} CPUs available to this process", err=True)
    return min(requested, cpus)


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"


# options that say where and how a process runs, not what it makes: left out of STORE/config.yaml (every rank
# writes it; stores made alike are alike byte for byte)
RUNTIME_OPTIONS = ("config", "out", "device", "workers", "rank", "world_size", "read_retries", "quiet")

POSITIVE = click.FloatRange(min=0, min_open=True)

read_retries_option = click.option(
    "--read-retries", default=5, show_default=True, type=click.IntRange(min=0),
    help="Reads from object storage that fail transiently (a dropped connection, a timeout) are retried this many "
         "times, waiting 1, 2, 4, ... s (at most 30 s); then the run stops naming the object.")


def _load_config(ctx: click.Context, _param, path):
    """--config FILE.yaml: its keys (option names, `batch-size` or `batch_size`) become the defaults, so
    flags given on the command line override them. Repeatable options take lists."""
    if path is None:
        return None
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option: value")
    params = {p.name: p for p in ctx.command.params if p.name != "config"}
    aliases = {opt.lstrip("-").replace("-", "_"): p.name for p in params.values() for opt in p.opts}
    defaults = {}
    for key, value in data.items():
        name = aliases.get(str(key).lstrip("-").replace("-", "_"), str(key) if str(key) in params else None)
        if name is None:
            raise click.BadParameter(f"{path}: hdistill {ctx.command.name} has no option {key!r}")
        defaults[name] = list(value) if params[name].multiple and isinstance(value, list) else \
            [value] if params[name].multiple else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


config_option = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
    callback=_load_config, help="A YAML file of options (keys as the long option names); flags override it.")


def write_config(folder: str, ctx: click.Context, leave_out=("config",)):
    """The resolved options as YAML in FOLDER/config.yaml (a path or a URL), loadable again with --config; keys in
    the command's option order, whether they came from flags or from a --config file."""
    import yaml

    from hdistill.common.storage import Location
    values = {p.name: list(v) if isinstance(v := ctx.params[p.name], tuple) else v
              for p in ctx.command.params if p.name in ctx.params and p.name not in leave_out}
    Location(folder).write_bytes("config.yaml", yaml.safe_dump(values, sort_keys=False).encode())


def stopping(run):
    """run(), turning a stop on SIGTERM (a checkpoint or the whole shards written) into its message and exit code."""
    from hdistill.common.processes import Stopped
    try:
        return run()
    except Stopped as stop:
        click.echo(str(stop), err=True)
        sys.exit(stop.exit_code)


class StorePlace(click.ParamType):
    """A store folder: a local path (checked like click.Path) or an s3://, gs:// or http(s):// URL (checked when
    it is opened, before any model is built)."""

    name = "PATH|URL"

    def __init__(self, exists: bool):
        self.local = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        from hdistill.common.storage import is_url
        return str(value) if is_url(value) else self.local.convert(value, param, ctx)


class LocalFolder(click.Path):
    """A local folder; a URL is refused with a clear message (rather than made into a folder named 's3:'), and so
    is a path below a file."""

    def __init__(self, what: str):
        super().__init__(file_okay=False)
        self.what = what

    def convert(self, value, param, ctx):
        from hdistill.common.storage import check_local_folder, is_url
        if is_url(value):
            self.fail(f"{value}: {self.what} is a local (or shared file system) folder, not a URL", param, ctx)
        try:
            check_local_folder(value, "")
        except HdistillError as err:
            self.fail(str(err).strip(), param, ctx)
        return super().convert(value, param, ctx)


def teacher_options(f):
    """Options that choose and load teachers (shared by the commands that run teachers)."""
    options = [
        click.option("--teachers", default="mae,clip", show_default=True,
                     help="Comma-separated teacher roles: mae (relations + mask), deit, clip, dino (features)."),
        click.option("--model", "models", multiple=True, metavar="ROLE=NAME",
                     help="Use another model for a role: a timm ViT name (with optional .tag) or "
                          "open_clip:ARCH[@TAG]. Repeatable."),
        click.option("--model-arg", "model_args", multiple=True, metavar="ROLE.KEY=VALUE",
                     help="Keyword argument for a teacher's model constructor, e.g. mae.depth=6. Repeatable."),
        click.option("--weights", multiple=True, metavar="ROLE=hub|PATH",
                     help="Teacher weights: 'hub' downloads the model's pretrained tag, a path loads a local file "
                          "through timm's / open_clip's pretrained path. '--weights hub' sets every role. Repeatable."),
        click.option("--random-init", is_flag=True,
                     help="Random teacher weights (seeded), recorded as such in the output. For tests and demos."),
        click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
                     help="View size in pixels."),
        click.option("--seed", default=0, show_default=True,
                     help="Seed of the views, of the store order and of random teacher weights."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="hdistill")
def cli():
    """hdistill: Hybrid Distillation from precomputed teacher targets.

    Run the teachers once (precompute), then train students from the store many times.
    """


@cli.command()
@config_option
@click.option("--data", required=True,
              help="Images: an ImageFolder tree, webdataset tars ('train-{000000..001281}.tar'), a text file of "
                   "image paths, or synthetic:N for N generated images; local, or on s3://, gs:// or http(s):// "
                   "(tars and list files; object storage needs pip install \"hdistill[cloud]\").")
@click.option("--out", required=True, type=StorePlace(exists=False),
              help="Store folder or URL (s3://bucket/store, gs://...): created; reruns resume.")
@teacher_options
@click.option("--target", "targets", multiple=True, metavar="ROLE:KIND[@B[,B...]]",
              help="A target to store, repeatable. KIND: feat (final features; feat@B: residual stream after "
                   "block B), rel@B (raw Q K^T of block B), msa@B (softmax(Q K^T/sqrt d) V of block B). Blocks are "
                   "0-indexed, negative from the end. Default: ROLE:feat of every non-MIM teacher and "
                   "mae:rel@-3,-2 (the paper's layers L-1 and L-2), e.g. --target clip:feat --target mae:rel@9,10.")
@click.option("--encoding", "encodings", multiple=True, metavar="[KIND|TARGET=]ENC",
              help="How targets are stored: fp16 (default), int8 (per-row scale, about half the bytes) or bf16 "
                   "(zarr only: mantissa rounding before compression). E.g. --encoding rel=int8, "
                   "--encoding rel.mae.b9=int8, or --encoding int8 for every target. Repeatable.")
@click.option("--mask-ratio", default=0.3, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="K: share of the kept patch tokens dropped at each mask stage; 0 keeps every token.")
@click.option("--mask-strategy", default="progressive", type=click.Choice(["progressive", "direct"]),
              show_default=True,
              help="progressive: a stage at each --mask-blocks block drops K of the kept patches (paper Sec. 3.2); "
                   "direct: one stage at the mask teacher's last block drops as many as those stages together, "
                   "so the student sees as many tokens (Tab. 8).")
@click.option("--mask-blocks", default=None, metavar="I,J,...",
              help="0-indexed blocks of the mask teacher whose outputs drive the progressive stages (default: "
                   "0,L/3,2L/3); with --mask-strategy direct, the stages whose token count it matches.")
@click.option("--mask-mean", default="normalized", type=click.Choice(["normalized", "raw"]), show_default=True,
              help="The average token of Eq. 4: mean of the kept patch tokens' L2-normalised copies (normalized: "
                   "PCAE's public code, where the paper takes its mask from) or of the tokens as they are (raw).")
@click.option("--mask-forward", default="full", type=click.Choice(["full", "drop"]), show_default=True,
              help="What a later stage ranks: full: the teacher's forward over all tokens, restricted to the kept "
                   "ones (one forward gives targets and mask); drop: as PCAE, a second forward whose blocks after "
                   "each stage run on the kept tokens only (more teacher time; see BENCHMARKS.md). The targets "
                   "are the full forward's either way.")
@click.option("--mask-teacher", default=None, help="Role whose blocks drive the mask (default: the MIM teacher).")
@click.option("--views", default=1, show_default=True, type=click.IntRange(min=1), help="Augmented views per image.")
@click.option("--crop", default="random", type=click.Choice(["random", "center"]), show_default=True,
              help="random: RandomResizedCrop (scale 0.2-1) + flip, for training stores; center: resize the short "
                   "side and take the centre (timm's 0.875 crop), no flip, one view, for validation stores.")
@click.option("--store", "store_mode", default="kept", type=click.Choice(["kept", "full"]), show_default=True,
              help="kept: only the progressive mask's tokens; full: every token, so any mask can be applied later.")
@click.option("--format", "formats", default="wds", show_default=True,
              help="wds (webdataset tars, streamed by train), zarr (random access), or wds,zarr.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Views per teacher forward.")
@click.option("--shard-size", default=1024, show_default=True, type=click.IntRange(min=1), help="Images per shard.")
@click.option("--precision", default="fp32", type=click.Choice(["fp32", "bf16"]), show_default=True,
              help="Teachers' forward precision. bf16 autocast is the fast choice on GPUs, but its targets differ from "
                   "fp32's by about 1% (the qkv output and the residual stream are bf16; see docs/FORMAT.md), "
                   "30-60x the fp16 storage error. Q K^T is formed in float32, the mask ranks in float64.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="Image decoding processes (default: 4, never more than the CPUs available).")
@click.option("--rank", default=None, type=int, help="This process's rank for array jobs (default: $RANK or 0).")
@click.option("--world-size", default=None, type=int, help="Number of ranks (default: $WORLD_SIZE or 1).")
@read_retries_option
@click.option("--quiet", is_flag=True,
              help="No progress bar (on a terminal) and no progress lines (otherwise, e.g. under SLURM).")
def precompute(data, out, teachers, models, model_args, weights, random_init, image_size, seed, targets, encodings,
               mask_ratio, mask_strategy, mask_blocks, mask_mean, mask_forward, mask_teacher, views, crop, store_mode, formats, limit, batch_size,
               shard_size, precision, device, workers, rank, world_size, read_retries, quiet):
    """Run the teachers over augmented views and write the target store.

    Kill it at any point and run the same command again to resume. Under
    `torchrun --nproc-per-node K -m hdistill precompute ...` each rank writes its own shards;
    the manifest is complete once every rank has finished.
    """
    from hdistill.common.storage import Retry
    from hdistill.precompute.run import PrecomputeConfig, Runtime, run_precompute
    from hdistill.shards.format import store_bytes

    roles = _split(teachers)
    cfg = PrecomputeConfig(
        data=absolute_data(data), teachers=roles, models=_pairs(models, "--model"), model_args=parse_model_args(model_args),
        weights=parse_weights(weights, roles), random_init=random_init, seed=seed, views=views, crop=crop,
        image_size=image_size, targets=list(targets) or None, encodings=list(encodings), mask_ratio=mask_ratio,
        mask_teacher=mask_teacher, mask_strategy=mask_strategy, mask_blocks=parse_ints(mask_blocks, "--mask-blocks"),
        mask_mean=mask_mean, mask_forward=mask_forward, store=store_mode, formats=_split(formats),
        batch_size=batch_size, shard_size=shard_size, limit=limit, precision=precision)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise HdistillError(f"--rank {rank} is not in 0..{world_size - 1} (--world-size {world_size})")
    rt = Runtime(device=resolve_device(device), workers=loader_workers(workers), rank=rank, world_size=world_size,
                 retry=Retry(attempts=read_retries), progress=not quiet and sys.stderr.isatty(),
                 log_lines=not quiet and not sys.stderr.isatty())
    if random_init:
        click.echo("note: teachers have RANDOM weights (--random-init); targets are for testing only", err=True)
    start = time.time()
    manifest = stopping(lambda: run_precompute(cfg, out, rt))
    ctx = click.get_current_context()
    ctx.params["data"] = cfg.data       # as the manifest records it
    write_config(out, ctx, leave_out=RUNTIME_OPTIONS)
    seconds = time.time() - start
    if manifest is None:
        click.echo(f"precompute: rank {rank}/{world_size} finished its shards in {seconds:.0f}s; the last rank to "
                   "finish writes the manifest")
        return
    nbytes = store_bytes(out)
    click.echo(f"precompute: {manifest.samples} views of {manifest.layout.num_images} images in "
               f"{len(manifest.shards)} shards, {len(manifest.skipped)} inputs skipped, {human_bytes(nbytes)} "
               f"({human_bytes(nbytes / max(manifest.samples, 1))}/view), {seconds:.1f}s; store complete: {out}")


@cli.command()
@config_option
@click.option("--shards", required=True, type=StorePlace(exists=True),
              help="A complete store made by hdistill precompute: a folder, or an s3://, gs:// or http(s):// URL.")
@click.option("--out", required=True, type=LocalFolder("the run folder"),
              help="Run folder: checkpoint, metrics, student.safetensors. A folder with a checkpoint resumes.")
@click.option("--student", default="vit_base_patch16_224", help="timm ViT name of the student (random init).")
@click.option("--student-arg", "student_args", multiple=True, metavar="KEY=VALUE",
              help="timm constructor argument of the student, e.g. depth=6. Repeatable.")
@click.option("--drop-path", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Stochastic depth rate of the student. 0.2 is FD's ViT-B recipe for a CLIP teacher, the "
                   "paper's main feature teacher (FD uses 0.3 with DeiT); use 0.1 or less for small students.")
@click.option("--student-mean", default="0.485,0.456,0.406", show_default=True,
              help="Per-channel mean the student normalises its input pixels with (ImageNet's, as MAE/dBOT "
                   "fine-tuning uses); written into student.safetensors.")
@click.option("--student-std", default="0.229,0.224,0.225", show_default=True,
              help="Per-channel std of the student's input normalisation.")
@click.option("--precision", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Student autocast precision (default: bf16 on CUDA, fp32 on the CPU); fp16 uses a gradient "
                   "scaler, for GPUs without bf16.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps (or give --epochs).")
@click.option("--epochs", type=POSITIVE, default=None, help="Epochs over the store; epoch e uses view e mod V.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1), help="Samples per step (global, over ranks).")
@click.option("--lr", type=POSITIVE, default=None,
              help="Peak learning rate (default 6e-4 x batch size / 1024, the paper's; README: small batches).")
@click.option("--weight-decay", default=0.05, type=click.FloatRange(min=0))
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps (default 5% of the steps).")
@click.option("--clip-grad", default=3.0, type=POSITIVE, help="Gradient norm clipping.")
@click.option("--loss", "losses", multiple=True, metavar="ROLE:KIND[@B[,B...]]=WEIGHT",
              help="A loss term on a stored target, repeatable: feat (final features), feat@B, msa@B (through a "
                   "linear projection to the per-token standardised target) or rel@B (raw Q K^T), e.g. "
                   "--loss clip:feat=1 --loss mae:rel@9,10=0.5. Default: the paper's Eq. 1, the feature teacher's "
                   "feat at 1 plus the MIM teacher's rel at its stored blocks at --alpha (their mean).")
@click.option("--alpha", default=1.0, type=click.FloatRange(min=0),
              help="Weight of the relation loss in the default objective.")
@click.option("--beta", default=2.0, type=POSITIVE, help="SmoothL1 beta.")
@click.option("--standardize-targets/--raw-targets", default=True,
              help="Per-token standardisation of the feature targets.")
@click.option("--feature-teacher", default=None,
              help="Default objective: role whose final features are the target (default: CLIP/DeiT/DINO in the store).")
@click.option("--relation-teacher", default=None,
              help="Default objective: role whose Q K^T is the target (default: the MIM teacher).")
@click.option("--relation-blocks", default=None, metavar="I,J",
              help="Default objective: stored teacher blocks to distill (default: all stored).")
@click.option("--student-blocks", default=None, metavar="T=S[,T=S...]",
              help="Student block S matched with teacher block T (default: the same offset from the end).")
@click.option("--mask", default="progressive", type=click.Choice(["progressive", "none", "random"]),
              help="Tokens the student sees; none and random need a --store full store.")
@click.option("--seed", default=0)
@click.option("--lanes", type=click.IntRange(min=1), default=None,
              help="Parts of the store every global batch mixes (default: gcd(16, --batch-size)). A rank reads "
                   "whole lanes: the rank count must divide it, and a rank's loader workers share its lanes, so "
                   "lanes / ranks bounds the workers that decode in parallel. The order of an epoch depends on the "
                   "seed, the epoch, the lanes and the batch only: a run resumes on any rank count dividing it.")
@click.option("--lane-buffer-mb", default=64.0, show_default=True, type=POSITIVE,
              help="Shuffle buffer per lane, in MB of decoded samples (a rank holds lanes/ranks of them).")
@click.option("--workers", default=2, type=click.IntRange(min=0),
              help="Loader processes per rank (at most lanes / ranks are used).")
@click.option("--reader", default=None, type=click.Choice(["wds", "zarr"]),
              help="Read the store's webdataset shards or its zarr arrays (same samples, same order). "
                   "Default: wds when the store holds it, else zarr.")
@click.option("--val-shards", default=None, type=StorePlace(exists=True),
              help="A store of held-out images (precompute --crop center), evaluated every --val-every steps and at "
                   "the end: val/loss and val/loss/<target> in metrics.jsonl and TensorBoard.")
@click.option("--val-every", default=1000, type=click.IntRange(min=1), help="Steps between evaluations of --val-shards.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--log-every", default=10, type=click.IntRange(min=1),
              help="Steps between metrics records (and progress lines when stderr is not a terminal).")
@click.option("--checkpoint-every", default=500, type=click.IntRange(min=1),
              help="Steps between checkpoints (checkpoint.pt and student.safetensors, written atomically).")
@click.option("--keep-checkpoints", default=0, type=click.IntRange(min=0),
              help="Also keep the last N checkpoints as RUN/checkpoints/step-<step>.pt (0: only the latest).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the student and loss.")
@click.option("--online", is_flag=True,
              help="Compute the same targets live with the store's teachers (baseline and correctness reference).")
@click.option("--fresh-views", is_flag=True,
              help="With --online: the teachers see a new RandomResizedCrop + flip of every image every epoch (the "
                   "paper's regime), not the store's V views; measures what fixed views cost.")
@click.option("--data", default=None,
              help="With --online: where the store's images are now, if not where precompute read them.")
@read_retries_option
@click.option("--quiet", is_flag=True,
              help="No progress bar (on a terminal) and no progress lines (otherwise, e.g. under SLURM).")
def train(shards, out, student, student_args, drop_path, student_mean, student_std, precision, steps, epochs,
          batch_size, lr, weight_decay, warmup_steps, clip_grad, losses, alpha, beta, standardize_targets,
          feature_teacher, relation_teacher, relation_blocks, student_blocks, mask, seed, lanes, lane_buffer_mb,
          workers, reader, val_shards, val_every, device, log_every, checkpoint_every, keep_checkpoints,
          compile_model, online, fresh_views, data, read_retries, quiet):
    """Train a ViT student from a store's targets: no teacher is loaded, no image decoded."""
    from hdistill.common.storage import Retry
    from hdistill.train.run import TrainConfig, Trainer, TrainRuntime

    cfg = TrainConfig(shards=shards, student=student, student_args=parse_student_args(student_args),
                      drop_path=drop_path, student_mean=parse_rgb(student_mean, "--student-mean"),
                      student_std=parse_rgb(student_std, "--student-std"), precision=precision, steps=steps,
                      epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_steps=warmup_steps, clip_grad=clip_grad, losses=list(losses) or None, alpha=alpha,
                      beta=beta, standardize_targets=standardize_targets, feature_teacher=feature_teacher,
                      relation_teacher=relation_teacher, relation_blocks=parse_ints(relation_blocks, "--relation-blocks"),
                      student_blocks=parse_block_pairs(student_blocks), mask=mask, seed=seed, lanes=lanes,
                      lane_buffer_mb=lane_buffer_mb, workers=workers, reader=reader, val_shards=val_shards,
                      val_every=val_every, fresh_views=fresh_views)
    rt = TrainRuntime(device=resolve_device(device), log_every=log_every, checkpoint_every=checkpoint_every,
                      progress=not quiet and sys.stderr.isatty(), compile=compile_model,
                      log_lines=not quiet and not sys.stderr.isatty(), keep_checkpoints=keep_checkpoints, data=data,
                      retry=Retry(attempts=read_retries))
    start = time.time()
    source = None
    if online:
        from hdistill.online import LiveTargets as source
    trainer = Trainer(cfg, out, rt, source)
    trainer.open()      # refusals (another run's options, another store, a running run) come before any file
    finished_before = trainer.finished
    if trainer.dist.main and not finished_before:
        write_config(out, click.get_current_context())
    path = stopping(trainer.run)
    if trainer.dist.main and not finished_before:
        click.echo(f"train: finished in {time.time() - start:.1f}s; metrics in {out}/metrics.jsonl; "
                   f"student backbone in {path}")


@cli.command()
@click.argument("store", type=StorePlace(exists=True))
def inspect(store):
    """Summarise a store: teachers, target table, mask, views, samples, bytes per view, skipped inputs."""
    from hdistill.shards.format import store_bytes
    from hdistill.shards.encoding import ENCODINGS
    from hdistill.shards.manifest import read_manifest

    m = read_manifest(store)
    layout, mask = m.layout, m.mask
    click.echo(f"store      {store}  (format v{m.format_version}, {'complete' if m.complete else 'INCOMPLETE'}, "
               f"{','.join(m.formats)})")
    click.echo(f"data       {m.config['data']}  images={layout.num_images} views={layout.views} "
               f"seed={layout.order_seed} size={layout.image_size} order=seeded permutation")
    for t in m.teachers:
        w = t.weights
        weights = {"file": f"file {w.get('path')} sha256 {str(w.get('sha256'))[:12]}", "hub": f"hub {w.get('tag')}",
                   "random-init": f"RANDOM INIT seed {w.get('seed')}"}[w["source"]]
        click.echo(f"teacher    {t.role:5s} {t.model}  patch {t.patch_size} grid {t.grid.side}x{t.grid.side} "
                   f"width {t.width} depth {t.depth} heads {t.heads}  [{weights}]")
    for t in m.targets:
        click.echo(f"target     {t.name:18s} {t.tap:14s} {ENCODINGS[t.encoding].dtype}{list(t.shape)} {t.encoding}")
    stages = f" (matching {mask.stages} progressive stages)" if mask.strategy == "direct" else ""
    click.echo("mask       " + (f"{mask.strategy} {mask.role} K={mask.ratio} blocks {list(mask.blocks)}{stages} "
                                 f"mean={mask.mean} forward={mask.forward}" if mask.role else "none (every patch kept)"))
    click.echo(f"tokens     store={m.store_mode}: {layout.stored_patches} of {layout.num_patches} patches per view (+CLS)")
    if m.complete:
        nbytes = store_bytes(store)
        click.echo(f"samples    {m.samples} in {len(m.shards)} shards, {human_bytes(nbytes)} in all files, "
                   f"{human_bytes(nbytes / max(m.samples, 1))} per view")
        click.echo(f"skipped    {len(m.skipped)} inputs")
        for s in m.skipped[:20]:
            click.echo(f"           {s['source']} (view {s['view']}): {s['reason']}")


@cli.command()
@click.argument("store", type=StorePlace(exists=True))
def verify(store):
    """Check every shard's checksum and every sample's arrays; name each bad shard."""
    from hdistill.shards.verify import verify_store

    manifest, problems = verify_store(store)
    for p in problems:
        click.echo(f"BAD  {p}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {store}")
    click.echo(f"ok: {len(manifest.shards)} shards, {manifest.samples} samples verified in {','.join(manifest.formats)}")


def parse_rgb(value: str, option: str) -> tuple[float, float, float]:
    try:
        rgb = tuple(float(v) for v in _split(value))
    except ValueError:
        rgb = ()
    if len(rgb) != 3:
        raise HdistillError(f"{option} {value!r}: expected three comma-separated numbers (R,G,B)")
    return rgb


def parse_block_pairs(value: str | None) -> dict[int, int] | None:
    """--student-blocks "9=5,10=6" -> {9: 5, 10: 6}."""
    if value is None:
        return None
    try:
        return {int(t): int(v) for t, _, v in (pair.partition("=") for pair in _split(value))}
    except ValueError:
        raise HdistillError(f"--student-blocks {value!r}: expected TEACHER=STUDENT block pairs, e.g. 9=5,10=6") from None


def parse_student_args(values) -> dict:
    kwargs = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise HdistillError(f"--student-arg {value!r}: expected KEY=VALUE, e.g. depth=6")
        kwargs[key] = parse_value(text)
    return kwargs


def build_models(roles, models, model_args, weights, random_init, students, student_model, student_args,
                 image_size, seed) -> dict:
    """Teachers by role and trained students, as analyse/eval take them: {label: model}."""
    from hdistill.analyze import student_as_teacher
    from hdistill.precompute.teachers import WeightSource, build_teacher

    role_list = _split(roles)
    names, kwargs, sources = _pairs(models, "--model"), parse_model_args(model_args), parse_weights(weights, role_list)
    chosen = {}
    for path in students:     # each as its file's metadata says, unless --student-model / --student-arg override it
        chosen[path] = student_as_teacher(path, student_model, image_size, parse_student_args(student_args))
    # teachers at the students' view size unless --image-size says otherwise
    image_size = image_size or next((m.info.image_size for m in chosen.values()), 224)
    for i, role in enumerate(role_list):
        if role not in sources and not random_init:
            raise HdistillError(f"no weights for teacher {role}: --weights {role}=hub|PATH or --random-init")
        source = WeightSource.parse(sources[role]) if role in sources else WeightSource("random", seed=seed * 1000 + i)
        chosen[role] = build_teacher(role, source, image_size, names.get(role), kwargs.get(role))
    if not chosen:
        raise HdistillError("no model given: pass --teacher and/or --student")
    return chosen


def model_options(f):
    """Options that choose teachers by role and trained students (analyze, eval)."""
    options = [
        click.option("--teacher", "roles", default="", help="Comma-separated teacher roles (e.g. mae,clip)."),
        click.option("--model", "models", multiple=True, metavar="ROLE=NAME", help="Another model for a role."),
        click.option("--model-arg", "model_args", multiple=True, metavar="ROLE.KEY=VALUE",
                     help="Teacher constructor argument."),
        click.option("--weights", multiple=True, metavar="ROLE=hub|PATH", help="Teacher weights ('hub' or a file)."),
        click.option("--random-init", is_flag=True, help="Random teacher weights (seeded)."),
        click.option("--student", "students", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="A trained student.safetensors (built as its metadata says), named by its path in the "
                          "output. Repeatable."),
        click.option("--student-model", default=None,
                     help="timm name of the students' architecture (default: the one each file records)."),
        click.option("--student-arg", "student_args", multiple=True, metavar="KEY=VALUE",
                     help="timm argument of the students, e.g. depth=6 (default: those each file records)."),
        click.option("--image-size", default=None, type=click.IntRange(min=1),
                     help="View size in pixels (default: the students' recorded size, else 224)."),
        click.option("--seed", default=0, help="Seed of random teacher weights and of the views."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the table and figures.")
@model_options
@click.option("--images", default=None, help="Images: a folder, list file, tars or synthetic:N.")
@click.option("--store", default=None, type=click.Path(exists=True, file_okay=False),
              help="Take the images (and view seed) of a store instead of --images.")
@click.option("--count", default=16, help="Images to average over.")
@click.option("--query", default=None, type=int, help="Patch index of the attention-map query (default: centre).")
@click.option("--layers", default=None, metavar="I,J", help="0-indexed layers of the attention-map figure.")
def analyze(out, roles, models, model_args, weights, random_init, students, student_model, student_args, image_size,
            seed, images, store, count, query, layers):
    """Attention distance and NMI per layer and head (paper Fig. 1, 2, 5), plus attention maps."""
    from hdistill.analyze import run_analysis
    from hdistill.shards.manifest import read_manifest

    if (images is None) == (store is None):
        raise HdistillError("give exactly one of --images and --store")
    if store:
        config = read_manifest(store).config
        images, seed = config["data"], config["seed"]
    chosen = build_models(roles, models, model_args, weights, random_init, students, student_model, student_args,
                          image_size, seed)
    files = run_analysis(chosen, images, count, out, query, parse_ints(layers, "--layers"), seed)
    click.echo("analyze: wrote " + ", ".join(str(f) for f in files))


@cli.command("eval")
@click.option("--data", required=True, help="A labelled ImageFolder (one sub-folder per class).")
@model_options
@click.option("--pool", default="cls", type=click.Choice(["cls", "mean"]), help="CLS token or mean of patch tokens.")
@click.option("--k", default=20, help="Neighbours of the kNN classifier.")
def evaluate(data, roles, models, model_args, weights, random_init, students, student_model, student_args,
             image_size, seed, pool, k):
    """kNN (cosine, k=20) and linear-probe top-1 on a fixed train/validation split of an ImageFolder."""
    from hdistill.evaluate import run_eval

    for label, model in build_models(roles, models, model_args, weights, random_init, students, student_model,
                                     student_args, image_size, seed).items():
        r = run_eval(model, data, pool, k)
        click.echo(f"eval {label}: {r['classes']} classes, {r['train']} train / {r['val']} val images, {pool} "
                   f"features: kNN top-1 {100 * r['knn_top1']:.1f}%, linear probe top-1 {100 * r['linear_top1']:.1f}%")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the store, run and figures.")
@click.option("--model", "models", multiple=True, metavar="ROLE=NAME",
              help="Teacher model for a role (default: small random-weight stand-ins). Repeatable.")
@click.option("--model-arg", "model_args", multiple=True, metavar="ROLE.KEY=VALUE", help="Teacher constructor argument.")
@click.option("--weights", multiple=True, metavar="ROLE=PATH", help="Real teacher weights, for every role (mae, clip).")
@click.option("--images", default=96, help="Generated images.")
@click.option("--steps", default=300, help="Student training steps.")
def demo(out, models, model_args, weights, images, steps):
    """The whole flow on generated images in a few minutes on a CPU: precompute, train, analyze."""
    from hdistill.demo import run_demo

    start = time.time()
    files = run_demo(out, _pairs(models, "--model"), parse_model_args(model_args), _pairs(weights, "--weights"),
                     images=images, steps=steps, echo=click.echo)
    click.echo(f"demo: done in {time.time() - start:.0f}s. Look at:")
    for name, path in files.items():
        click.echo(f"  {name:24s} {path}")


def main():
    # OpenMP threads that wait for work sleep instead of spinning: on a CPU shared with other processes a spinning
    # thread holds a core that the thread it waits for needs (the demo ran 10x slower beside one busy process;
    # passive, about 2x for half the CPU, and 10-20% slower on an idle one: BENCHMARKS.md). A value set by the user
    # is kept; it must be set before torch loads OpenMP, so here, before any command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli(prog_name="hdistill")
