"""What `hdistill train` trains (TrainConfig), how this process runs it (TrainRuntime) and where online targets come
from (OnlineConfig): the fields are the command's options (common.options), so the flags, the --config keys,
a sweep's keys and RUN/config.yaml are one list."""
from __future__ import annotations

from dataclasses import dataclass, replace

import click

from hdistill.common.options import (StorePlace, absolute_place, option, quiet_option, read_retries_option, parse_block_pairs, parse_ints, parse_kwargs, parse_or_none,
                                     parse_rgb)
from hdistill.common.runtime import ProgressOutput, resolve_device
from hdistill.common.storage import Retry

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # what MAE / dBOT pre-training and fine-tuning normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)
POSITIVE = click.FloatRange(min=0, min_open=True)
AT_LEAST_1 = click.IntRange(min=1)
DEFAULT_LR = 6e-4                        # at batch 1024, scaled linearly (paper Sec. 4.1, dBOT)


def rgb_text(rgb) -> str:
    return ",".join(str(v) for v in rgb)


@dataclass
class TrainConfig:
    """Everything that decides a run's result; a run directory only resumes with an equal config."""

    shards: str = option(help="A complete store made by hdistill precompute: a folder, or an s3://, gs:// or "
                              "http(s):// URL.", type=StorePlace(exists=True), parse=absolute_place)
    student: str = option("vit_base_patch16_224", "timm ViT name of the student (random init).")
    student_args: dict = option(default_factory=dict, flag="--student-arg", multiple=True, metavar="KEY=VALUE",
                                parse=parse_kwargs,
                                help="timm constructor argument of the student, e.g. depth=6. Repeatable.")
    drop_path: float = option(0.2, type=click.FloatRange(0, 1, max_open=True),
                              help="Stochastic depth rate of the student. 0.2 is FD's ViT-B recipe for a CLIP "
                                   "teacher, the paper's main feature teacher (FD uses 0.3 with DeiT); use 0.1 or "
                                   "less for small students.")
    student_mean: tuple[float, float, float] = option(
        IMAGENET_MEAN, cli=rgb_text(IMAGENET_MEAN), parse=parse_rgb,
        help="Per-channel mean the student normalises its input pixels with (ImageNet's, as MAE/dBOT fine-tuning "
             "uses); written into student.safetensors.")
    student_std: tuple[float, float, float] = option(IMAGENET_STD, cli=rgb_text(IMAGENET_STD), parse=parse_rgb,
                                                     help="Per-channel std of the student's input normalisation.")
    precision: str | None = option(None, type=click.Choice(["bf16", "fp16", "fp32"]),
                                   help="Student autocast precision (default: bf16 on CUDA, fp32 on the CPU); fp16 "
                                        "uses a gradient scaler, for GPUs without bf16.")
    steps: int | None = option(None, "Optimiser steps (or give --epochs).", type=AT_LEAST_1)
    epochs: float | None = option(None, "Epochs over the store; epoch e uses view e mod V.", type=POSITIVE)
    batch_size: int = option(256, "Samples per optimiser step, global: summed over all ranks (each rank takes "
                                  "batch-size / ranks).", type=AT_LEAST_1)
    lr: float | None = option(None, type=POSITIVE,
                              help="Peak learning rate (default 6e-4 x batch size / 1024, the paper's; README: "
                                   "small batches).")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms, position embeddings, CLS).",
                                 type=click.FloatRange(min=0))
    warmup_steps: int | None = option(None, "Linear warm-up steps (default 5% of the steps).",
                                      type=click.IntRange(min=0))
    clip_grad: float = option(3.0, "Gradient norm clipping.", type=POSITIVE)
    losses: list[str] | None = option(
        None, flag="--loss", multiple=True, metavar="ROLE:KIND[@B[,B...]]=WEIGHT", parse=parse_or_none,
        help="A loss term on a stored target, repeatable: feat (final features), feat@B, msa@B (through a linear "
             "projection to the per-token standardised target), rel@B (raw Q K^T) or dec@B (G2SD: the student's "
             "decoder output, its encoder seeing the patches the teacher saw), e.g. --loss clip:feat=1 "
             "--loss mae:rel@9,10=0.5. Default: the paper's Eq. 1, the feature teacher's feat at 1 plus the MIM "
             "teacher's rel at its stored blocks at --alpha (their mean).")
    alpha: float = option(1.0, "Weight of the relation loss in the default objective.", type=click.FloatRange(min=0))
    beta: float = option(2.0, "SmoothL1 beta.", type=POSITIVE)
    standardize_targets: bool = option(True, "Per-token standardisation of the feature targets.",
                                       flag="--standardize-targets/--raw-targets")
    feature_teacher: str | None = option(None, "Default objective: role whose final features are the target "
                                               "(default: CLIP/DeiT/DINO in the store).")
    relation_teacher: str | None = option(None, "Default objective: role whose Q K^T is the target (default: the "
                                                "MIM teacher).")
    relation_blocks: list[int] | None = option(None, "Default objective: stored teacher blocks to distill (default: "
                                                     "all stored).", metavar="I,J", parse=parse_ints)
    student_blocks: dict[int, int] | None = option(
        None, "Student block S matched with teacher block T (default: the same offset from the end).",
        metavar="T=S[,T=S...]", parse=parse_block_pairs)
    mask: str = option("progressive", type=click.Choice(["progressive", "none", "random"]),
                       help="Tokens the student sees; none and random need a store made with --tokens full.")
    decoder_depth: int = option(0, "Blocks of a light decoder on the student (MAE's; 0: none): the final feature "
                                   "and dec terms are then taken at its output, and it is exported apart "
                                   "(RUN/decoder.safetensors).", type=click.IntRange(min=0))
    decoder_width: int = option(512, "Width of the student's decoder (MAE: 512; a multiple of 4).", type=AT_LEAST_1)
    decoder_heads: int = option(16, "Attention heads of the student's decoder (MAE: 16).", type=AT_LEAST_1)
    reconstruct: float = option(
        0.0, type=click.FloatRange(0, 1, max_open=True),
        help="Masked feature reconstruction (dBOT, G2SD: 0.75): the encoder sees a random 1 - R of the patches, "
             "drawn from --seed, the epoch and the sample, and the decoder predicts every token. Needs "
             "--decoder-depth and --mask none (a store made with --tokens full).")
    reconstruct_tokens: str = option("masked", type=click.Choice(["masked", "all"]),
                                     help="With a masked input (--reconstruct, or dec terms): the final feature "
                                          "terms average over the patches the encoder did not see (dBOT's), or "
                                          "over every token.")
    seed: int = option(0, "Seed of the data order (and, unless --init-seed, of the student's initialisation and "
                          "stochastic depth).")
    init_seed: int | None = option(None, type=int, help="Seed of the student's initialisation and stochastic depth (default: "
                                         "--seed). The data order stays --seed's, so a sweep member's options, run "
                                         "alone, reproduce it.")
    lanes: int | None = option(
        None, type=AT_LEAST_1,
        help="Parts of the store every global batch mixes (default: gcd(16, --batch-size)). A rank reads whole "
             "lanes: the rank count must divide it, and a rank's loader workers share its lanes, so lanes / ranks "
             "bounds the workers that decode in parallel. The order of an epoch depends on the seed, the epoch, the "
             "lanes and the batch only: a run resumes on any rank count dividing it.")
    lane_buffer_mb: float = option(64.0, "Shuffle buffer per lane, in MB of decoded samples (a rank holds lanes/ranks "
                                         "of them).", type=POSITIVE)
    val_shards: str | None = option(
        None, type=StorePlace(exists=True), parse=absolute_place, help="A store of held-out images (precompute --crop center), evaluated every --val-every steps and at "
                   "the end: val/loss and val/loss/<target> in metrics.jsonl and TensorBoard.")
    val_every: int = option(1000, "Steps between evaluations of --val-shards.", type=AT_LEAST_1)


@dataclass
class TrainRuntime(ProgressOutput):
    """How this process runs a training; does not change its result (a run resumes with other values)."""

    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun, cuda is cuda:LOCAL_RANK).")
    workers: int = option(2, "Loader processes per rank (at most lanes / ranks are used).",
                          type=click.IntRange(min=0))
    format: str | None = option(None, type=click.Choice(["wds", "zarr"]),
                                help="Read the store's webdataset shards or its zarr arrays (same samples, same "
                                     "order). Default: wds when the store holds it, else zarr.")
    log_every: int = option(10, "Steps between metrics records (and progress lines when stderr is not a terminal).",
                            type=AT_LEAST_1)
    checkpoint_every: int = option(500, "Steps between checkpoints (checkpoint.pt and student.safetensors, written "
                                        "atomically).", type=AT_LEAST_1)
    keep_checkpoints: int = option(0, "Also keep the last N checkpoints as RUN/checkpoints/step-<step>.pt (0: only "
                                      "the latest).", type=click.IntRange(min=0))
    compile: bool = option(False, "torch.compile the student and loss.", is_flag=True)
    retry: Retry = read_retries_option()          # reads of the store on object storage
    quiet: bool = quiet_option()

    def resolved(self) -> "TrainRuntime":
        return replace(self, device=resolve_device(self.device))


@dataclass
class OnlineConfig:
    """The online source: the same targets computed live by the store's teachers (hdistill.online)."""

    online: bool = option(False, "Compute the store's targets live with its teachers (baseline and correctness "
                                 "reference).", is_flag=True)
    fresh_views: bool = option(False, "With --online: the teachers see a new RandomResizedCrop + flip of every "
                                      "image every epoch (the paper's regime), not the store's V views; measures "
                                      "what fixed views cost.", is_flag=True)
    data: str | None = option(None, "With --online: where the store's images are now, if not where precompute "
                                    "read them.", parse=absolute_place)
