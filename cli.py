"""The `hdistill` command line. Composes precompute and the store tools; errors print without tracebacks."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from hdistill import __version__
from hdistill.common.errors import HdistillError
from hdistill.common.options import (LocalFolder, StorePlace, absolute_place, cli_values, command_options, from_params,
                                     option_fields, options_yaml, params_from_yaml, parse_ints, parse_pairs,
                                     parse_role_kwargs)
from hdistill.analysis_options import ModelsConfig
from hdistill.precompute.config import PrecomputeConfig, Runtime
from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime

OPTION_CLASSES: dict[str, tuple] = {}     # command name -> the config classes its options come from


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HdistillError as err:
            raise click.ClickException(str(err)) from None


def _load_config(ctx: click.Context, _param, path):
    """--config FILE.yaml: its keys (option names, `batch_size` or `batch-size`) become the defaults, so flags given
    on the command line override them. Repeatable options take lists."""
    if path is None:
        return None
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option: value")
    _yaml_defaults(ctx, data, path)
    return path


def _read_yaml(path: str):
    import yaml
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise click.BadParameter(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(f"{path}: {err}") from None


def _load_sweep(ctx: click.Context, _param, path):
    """--sweep FILE.yaml: its shared keys as --config's; its `members` kept for the command."""
    if path is None:
        return None
    from hdistill.train.sweep import check_members
    data = _read_yaml(path)
    if not isinstance(data, dict) or "members" not in data:
        raise click.BadParameter(f"{path}: expected a mapping of shared options and a list `members`")
    try:
        ctx.meta["sweep_members"] = check_members(data.pop("members"), path)
    except HdistillError as err:
        raise click.BadParameter(str(err)) from None
    _yaml_defaults(ctx, data, path)
    return path


def _yaml_defaults(ctx: click.Context, data: dict, path: str):
    """A YAML mapping of options as the command's defaults (flags given on the command line override them)."""
    own = {p.name for p in ctx.command.params if not p.multiple} - {"config"}   # the command's own (--out)
    own -= {f.name for cls in OPTION_CLASSES[ctx.command.name] for f in option_fields(cls)}
    plain = {key: data.pop(key) for key in list(data) if str(key).replace("-", "_") in own}
    try:
        defaults = params_from_yaml(OPTION_CLASSES[ctx.command.name], data, f"hdistill {ctx.command.name}")
    except HdistillError as err:
        raise click.BadParameter(f"{path}: {err}") from None
    defaults.update({key.replace("-", "_"): value for key, value in plain.items()})
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def configured(*classes):
    """A command whose options are the option fields of `classes`, plus --config FILE.yaml of the same keys."""
    def decorate(fn):
        OPTION_CLASSES[fn.__name__] = classes
        fn = command_options(*classes)(fn)
        return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                            expose_value=False, callback=_load_config,
                            help="A YAML file of options (keys as the long option names); flags override it.")(fn)
    return decorate


def stopping(run):
    """run(), turning a stop on SIGTERM (a checkpoint or the whole shards written) into its message and exit code."""
    from hdistill.common.processes import Stopped
    try:
        return run()
    except Stopped as stop:
        click.echo(str(stop), err=True)
        sys.exit(stop.exit_code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="hdistill")
def cli():
    """hdistill: Hybrid Distillation from precomputed teacher targets.

    Run the teachers once (precompute), then train students from the store many times.
    """


@cli.command()
@click.option("--out", required=True, type=StorePlace(exists=False),
              help="Store folder or URL (s3://bucket/store, gs://...): created; reruns resume.")
@configured(PrecomputeConfig, Runtime)
def precompute(out, **params):
    """Run the teachers over augmented views and write the target store.

    Kill it at any point and run the same command again to resume. Under
    `torchrun --nproc-per-node K -m hdistill precompute ...` each rank writes its own shards;
    the manifest is complete once every rank has finished.
    """
    from hdistill.precompute.run import run_precompute
    from hdistill.shards.format import store_bytes
    from hdistill.shards.size import human
    from hdistill.shards.writer import write_store_options

    cfg, rt = from_params(PrecomputeConfig, params), from_params(Runtime, params).resolved()
    if cfg.random_init:
        click.echo("note: teachers have RANDOM weights (--random-init); targets are for testing only", err=True)
    start = time.time()
    manifest = stopping(lambda: run_precompute(cfg, out, rt))
    if rt.dry_run:
        return
    # the store's options (not this process's), with --data as the manifest records it
    write_store_options(out, options_yaml(cli_values([PrecomputeConfig], {**params, "data": cfg.data})))
    seconds = time.time() - start
    if manifest is None:
        click.echo(f"precompute: rank {rt.rank}/{rt.world_size} finished its shards in {seconds:.0f}s; the last rank "
                   "to finish writes the manifest")
        return
    nbytes = store_bytes(out)
    click.echo(f"precompute: {manifest.samples} views of {manifest.layout.num_images} images in "
               f"{len(manifest.shards)} shards, {len(manifest.skipped)} inputs skipped, {human(nbytes)} "
               f"({human(nbytes / max(manifest.samples, 1))}/view), {seconds:.1f}s; store complete: {out}")


@cli.command()
@click.option("--out", required=True, type=LocalFolder("the run folder"),
              help="Run folder: checkpoint, metrics, student.safetensors. A folder with a checkpoint resumes.")
@click.option("--sweep", type=click.Path(exists=True, dir_okay=False), is_eager=True, callback=_load_sweep,
              help="Train the students of a sweep file from one pass over the store: its shared options (keys as "
                   "--config's) and a list `members`, each a name and the options it overrides (README: sweeps).")
@configured(TrainConfig, TrainRuntime, OnlineConfig)
def train(out, sweep, **params):
    """Train a ViT student from a store's targets: no teacher is loaded, no image decoded."""
    from hdistill.train.checkpoint import EXPORT, METRICS
    from hdistill.train.run import solo

    if sweep:
        return train_sweep(out, sweep, click.get_current_context().meta["sweep_members"], params)
    cfg, rt, online = (from_params(cls, params) for cls in (TrainConfig, TrainRuntime, OnlineConfig))
    start = time.time()
    source = {}
    if online.online and cfg.reconstruct:
        raise HdistillError("--reconstruct draws the encoder's patches from the store's batches: it does not take "
                            "--online")
    if online.online:
        from hdistill.online import live_targets
        source = {"source": live_targets(online)}
    elif online.fresh_views or online.data:
        raise HdistillError("--fresh-views and --data render views with the teachers: they need --online")
    loop = solo(cfg, out, rt, **source)
    loop.open()      # refusals (another run's options, another store, a running run) come before any file
    finished_before = loop.finished
    loop.write_options({"train": options_yaml({"out": os.path.abspath(out), **run_options(params)})})
    stopping(loop.run)
    if loop.dist.main and not finished_before:
        click.echo(f"train: finished in {time.time() - start:.1f}s; metrics in {Path(out) / METRICS}; "
                   f"student backbone in {Path(out) / EXPORT}")


def run_options(params: dict) -> dict:
    """RUN/config.yaml's options: the command's, local places made absolute (--config then loads it from anywhere)."""
    places = {key: absolute_place(params[key]) for key in ("shards", "val_shards", "data")}
    return cli_values([TrainConfig, TrainRuntime, OnlineConfig], {**params, **places})


def train_sweep(out: str, file: str, members: list[tuple[str, dict]], params: dict):
    from hdistill.train.report import write_report
    from hdistill.train.sweep import build_sweep, member_options

    if params["online"] or params["fresh_views"] or params["data"]:
        raise HdistillError("--sweep trains from the store's targets: it does not take --online, --fresh-views or "
                            "--data")
    start = time.time()
    member_params = member_options(params, members)
    loop = build_sweep([(name, from_params(TrainConfig, p)) for name, p in member_params.items()], out,
                       from_params(TrainRuntime, params), dict(members), file=file)
    loop.open()
    loop.write_options({name: options_yaml({"out": os.path.abspath(Path(out) / name), **run_options(p)})
                        for name, p in member_params.items()})
    stopping(loop.run)
    if loop.dist.main:
        files = write_report(out)
        click.echo(f"train: sweep of {len(members)} members finished in {time.time() - start:.1f}s; "
                   f"{', '.join(str(f) for f in files)}")


@cli.command("sweep-report")
@click.argument("run", type=click.Path(file_okay=False))
def sweep_report(run):
    """The table (CSV and Markdown) and the held-out curves (PNG) of a sweep's members."""
    from hdistill.train.report import write_report
    click.echo("sweep-report: wrote " + ", ".join(str(f) for f in write_report(run)))


@cli.command()
@click.argument("store", type=StorePlace(exists=True))
def inspect(store):
    """Summarise a store: teachers, target table, mask, views, samples, bytes per view, skipped inputs."""
    from hdistill.shards.inspect import describe_store
    for line in describe_store(store):
        click.echo(line)


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


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the table and figures.")
@command_options(ModelsConfig)
@click.option("--data", default=None, help="Images: a folder, list file, tars or synthetic:N.")
@click.option("--shards", default=None, type=StorePlace(exists=True),
              help="Take the images (and view seed) of a store instead of --data.")
@click.option("--count", default=16, help="Images to average over.")
@click.option("--query", default=None, type=int, help="Patch index of the attention-map query (default: centre).")
@click.option("--layers", default=None, metavar="I,J", help="0-indexed layers of the attention-map figure.")
def analyze(out, data, shards, count, query, layers, **params):
    """Attention distance and NMI per layer and head (paper Fig. 1, 2, 5), plus attention maps."""
    from hdistill.analyze import run_analysis
    from hdistill.train.loader import Store

    if (data is None) == (shards is None):
        raise HdistillError("give exactly one of --data and --shards")
    if shards:
        config = Store(shards).manifest.config
        data, params["seed"] = config["data"], config["seed"]
    chosen = from_params(ModelsConfig, params).build()
    files = run_analysis(chosen, data, count, out, query, parse_ints(layers, "--layers"), params["seed"])
    click.echo("analyze: wrote " + ", ".join(str(f) for f in files))


@cli.command("eval")
@click.option("--data", required=True, help="A labelled ImageFolder (one sub-folder per class).")
@command_options(ModelsConfig)
@click.option("--pool", default="cls", type=click.Choice(["cls", "mean"]), help="CLS token or mean of patch tokens.")
@click.option("--k", default=20, help="Neighbours of the kNN classifier.")
def evaluate(data, pool, k, **params):
    """kNN (cosine, k=20) and linear-probe top-1 on a fixed train/validation split of an ImageFolder."""
    from hdistill.evaluate import run_eval

    for label, model in from_params(ModelsConfig, params).build().items():
        r = run_eval(model, data, pool, k)
        click.echo(f"eval {label}: {r['classes']} classes, {r['train']} train / {r['val']} val images at "
                   f"{model.info.image_size} px, {pool} "
                   f"features: kNN top-1 {100 * r['knn_top1']:.1f}%, linear probe top-1 {100 * r['linear_top1']:.1f}%")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the store, run and figures.")
@click.option("--model", "models", multiple=True, metavar="ROLE=NAME",
              help="Teacher model for a role (default: small random-weight stand-ins). Repeatable.")
@click.option("--model-arg", "model_args", multiple=True, metavar="ROLE.KEY=VALUE", help="Teacher constructor argument.")
@click.option("--weights", multiple=True, metavar="ROLE=PATH", help="Real teacher weights, for every role (mae, clip).")
@click.option("--num-images", default=96, help="Generated images.")
@click.option("--steps", default=300, help="Student training steps.")
def demo(out, models, model_args, weights, num_images, steps):
    """The whole flow on generated images in a few minutes on a CPU: precompute, train, analyze."""
    from hdistill.demo import run_demo

    start = time.time()
    files = run_demo(out, parse_pairs(models, "--model"), parse_role_kwargs(model_args, "--model-arg"),
                     parse_pairs(weights, "--weights"), images=num_images, steps=steps, echo=click.echo)
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
