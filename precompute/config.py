"""What `hdistill precompute` makes (PrecomputeConfig) and how this process runs it (Runtime): the fields are the
command's options (common.options), so the flags, the --config keys and STORE/config.yaml are one list."""
from __future__ import annotations

from dataclasses import dataclass, replace

import click

from hdistill.common.errors import HdistillError
from hdistill.common.options import (absolute_place, option, parse_ints, parse_list, parse_or_none, parse_pairs,
                                     parse_role_kwargs, quiet_option, read_retries_option)
from hdistill.common.runtime import ProgressOutput, loader_workers, process_rank, resolve_device
from hdistill.common.storage import Retry
from hdistill.shards.format import ZSTD_SAVING

FRACTION = click.FloatRange(0, 1, max_open=True)
AT_LEAST_1 = click.IntRange(min=1)


def parse_weights(values, option_name: str) -> dict[str, str]:
    """["mae=hub", "clip=PATH"] -> {"mae": "hub", ...}; a lone "hub" is {"*": "hub"}: every role (every_role)."""
    return {"*": "hub"} if list(values) == ["hub"] else parse_pairs(values, option_name)


def check_roles(teachers: list[str]):
    """Each teacher role once: a role names the targets (feat.<role>) of one teacher."""
    twice = sorted({role for role in teachers if teachers.count(role) > 1})
    if twice:
        raise HdistillError(f"--teachers {','.join(teachers)} names {', '.join(twice)} more than once; a role is one "
                            "teacher (for two models of one kind give them two roles, e.g. --teachers mae,clip,dino "
                            "--model dino=NAME)")


def every_role(weights: dict[str, str], teachers: list[str]) -> dict[str, str]:
    """--weights with "*" (a lone --weights hub) given to every teacher role."""
    return {role: weights["*"] for role in teachers} if weights.get("*") else weights


DATA_HELP = ("Images: an ImageFolder tree, webdataset tars ('train-{000000..001281}.tar'), a text file of image paths, "
             "or synthetic:N for N generated images; local, or on s3://, gs:// or http(s):// (tars and list files; "
             "object storage needs pip install \"hdistill[cloud]\").")
TEACHERS_HELP = "Comma-separated teacher roles: mae (relations + mask), deit, clip, dino (features)."
MODEL_HELP = ("Use another model for a role: a timm ViT name (with optional .tag) or open_clip:ARCH[@TAG]. "
              "Repeatable.")
MODEL_ARG_HELP = "Keyword argument for a teacher's model constructor, e.g. mae.depth=6. Repeatable."
WEIGHTS_HELP = ("Teacher weights: 'hub' downloads the model's pretrained tag, a path loads a local file through "
                "timm's / open_clip's pretrained path. '--weights hub' sets every role. Repeatable.")
RANDOM_INIT_HELP = "Random teacher weights (seeded), recorded as such in the output. For tests and demos."
DEVICE_HELP = "auto, cpu, cuda or cuda:N (under torchrun, cuda is cuda:LOCAL_RANK)."


# the options of a store of float16 targets and the pixels as rendered (the default before format v6)
EXACT = {"encodings": ["fp16"], "pixels": "raw", "compress": "none"}


@dataclass
class PrecomputeConfig:
    """Everything that decides a store's content; a store only resumes with an equal config."""

    data: str = option(help=DATA_HELP, parse=absolute_place)
    teachers: list[str] = option(default_factory=lambda: ["mae", "clip"], cli="mae,clip", parse=parse_list,
                                 help=TEACHERS_HELP)
    models: dict[str, str] = option(default_factory=dict, flag="--model", multiple=True, metavar="ROLE=NAME",
                                    parse=parse_pairs, help=MODEL_HELP)
    model_args: dict[str, dict] = option(default_factory=dict, flag="--model-arg", multiple=True,
                                         metavar="ROLE.KEY=VALUE", parse=parse_role_kwargs, help=MODEL_ARG_HELP)
    weights: dict[str, str] = option(default_factory=dict, multiple=True, metavar="ROLE=hub|PATH",
                                     parse=parse_weights, help=WEIGHTS_HELP)     # role -> "hub" | path
    random_init: bool = option(False, is_flag=True, help=RANDOM_INIT_HELP)
    seed: int = option(0, "Seed of the views, of the store order and of random teacher weights.")
    views: int = option(1, "Augmented views per image.", type=AT_LEAST_1)
    crop: str = option("random", type=click.Choice(["random", "center"]),
                       help="random: RandomResizedCrop (scale 0.2-1) + flip, for training stores; center: resize the "
                            "short side and take the centre (timm's 0.875 crop), no flip, one view, for validation "
                            "stores.")
    image_size: int = option(224, "View size in pixels.", type=AT_LEAST_1)
    targets: list[str] | None = option(
        None, flag="--target", multiple=True, metavar="ROLE:KIND[@B[,B...]]", parse=parse_or_none,
        help="A target to store, repeatable. KIND: feat (final features; feat@B: residual stream after block B), "
             "rel@B (raw Q K^T of block B), msa@B (softmax(Q K^T/sqrt d) V of block B), dec@B (an MAE teacher's "
             "decoder state after decoder block B on the view's teacher mask, G2SD's; needs --tokens full). Blocks "
             "are 0-indexed, "
             "negative from the end. Default: ROLE:feat of every non-MIM teacher and mae:rel@-3,-2 (the paper's "
             "layers L-1 and L-2), e.g. --target clip:feat --target mae:rel@9,10.")
    encodings: list[str] = option(
        default_factory=lambda: ["int4"], flag="--encoding", multiple=True, metavar="[KIND|TARGET=]ENC",
        help="How targets are stored: int4 (the default: 4 bits a value and a scale per 32, a quarter of fp16's bytes), "
             "int8 (per-row scale, half), fp16 (as computed, rounded to float16) or bf16 (zarr only: mantissa "
             "rounding before compression). E.g. --encoding fp16 for every target, --encoding int4 --encoding "
             "rel=int8, --encoding rel.mae.b9=fp16 (the most specific wins). Repeatable; giving any replaces the "
             "default.")
    pixels: str = option(
        "jpeg", type=click.Choice(["raw", "jpeg"]),
        help="How the student's input pixels are stored: jpeg (the default: one 4:4:4 JPEG of the stored patches, "
             "about 140 bytes a 16-px patch at quality 90; the teacher runs on its decoded pixels, so the student reads "
             "exactly what the teacher saw; webdataset only) or raw (uint8 patches as rendered, 768 bytes a patch).")
    jpeg_quality: int = option(90, "JPEG quality of --pixels jpeg (PIL's 1-100).", type=click.IntRange(1, 100))
    compress: str = option(
        "zstd", type=click.Choice(["none", "zstd"]),
        help=f"zstd (the default): each target array of a webdataset sample, and its scales, is a zstd frame "
             f"(<name>.npy.zst), which saves {ZSTD_SAVING}, for a decode per array as the loader reads it; none: plain "
             "npy. zarr chunks are always compressed.")
    mask_ratio: float = option(0.3, type=FRACTION,
                               help="K: share of the kept patch tokens dropped at each mask stage; 0 keeps every "
                                    "token.")
    mask_teacher: str | None = option(None, "Role whose blocks drive the mask (default: the MIM teacher).")
    mask_strategy: str = option(
        "progressive", type=click.Choice(["progressive", "direct"]),
        help="progressive: a stage at each --mask-blocks block drops K of the kept patches (paper Sec. 3.2); "
             "direct: one stage at the mask teacher's last block drops as many as those stages together, so the "
             "student sees as many tokens (Tab. 8).")
    mask_blocks: list[int] | None = option(
        None, metavar="I,J,...", parse=parse_ints,
        help="0-indexed blocks of the mask teacher whose outputs drive the progressive stages (default: 0,L/3,2L/3); "
             "with --mask-strategy direct, the stages whose token count it matches.")
    mask_mean: str = option(
        "normalized", type=click.Choice(["normalized", "raw"]),
        help="The average token of Eq. 4: mean of the kept patch tokens' L2-normalised copies (normalized: PCAE's "
             "public code, where the paper takes its mask from) or of the tokens as they are (raw).")
    mask_forward: str = option(
        "full", type=click.Choice(["full", "drop"]),
        help="What a later stage ranks: full: the teacher's forward over all tokens, restricted to the kept ones "
             "(one forward gives targets and mask); drop: as PCAE, a second forward whose blocks after each stage "
             "run on the kept tokens only (more teacher time; see BENCHMARKS.md). The targets are the full "
             "forward's either way.")
    tokens: str = option("kept", type=click.Choice(["kept", "full"]),
                         help="kept: only the progressive mask's tokens; full: every token, so any mask can be "
                              "applied later (train --mask none|random).")
    teacher_mask_ratio: float = option(
        0.75, type=FRACTION,
        help="dec targets (G2SD): the share of each view's patches an MAE teacher's encoder does not see, drawn per "
             "view from the seed and stored as the sample's visible patches, which the student then sees.")
    formats: list[str] = option(default_factory=lambda: ["wds"], flag="--format", cli="wds", parse=parse_list,
                                help="wds (webdataset tars, streamed by train), zarr (random access), or wds,zarr.")
    batch_size: int = option(64, "Views per teacher forward, per rank.", type=AT_LEAST_1)
    shard_size: int = option(1024, "Images per shard.", type=AT_LEAST_1)
    limit: int | None = option(None, "Use only the first N images.", type=AT_LEAST_1)
    max_image_pixels: int | None = option(
        None, type=AT_LEAST_1,
        help="Skip (as unreadable, listed in the manifest) images of more pixels than this. Default: PIL's "
             "decompression-bomb limit, 89,478,485 (e.g. 12,000 x 7,500); raise it for larger photos.")
    precision: str = option(
        "fp32", type=click.Choice(["fp32", "bf16"]),
        help="Teachers' forward precision. bf16 autocast is the fast choice on GPUs, but its targets differ from "
             "fp32's by about 1% (the qkv output and the residual stream are bf16; see docs/FORMAT.md), 30-60x the "
             "fp16 storage error. Q K^T is formed in float32, the mask ranks in float64.")

    def __post_init__(self):
        self.weights = every_role(self.weights, self.teachers)

    def validate(self):
        from hdistill.shards.encoding import check_formats, parse_encodings
        from hdistill.shards.format import FORMATS
        check_roles(self.teachers)
        if self.precision not in ("fp32", "bf16"):
            raise HdistillError(f"--precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.tokens not in ("kept", "full"):
            raise HdistillError(f"--tokens must be 'kept' or 'full', got {self.tokens!r}")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise HdistillError(f"--format {','.join(self.formats) or '(empty)'}: use wds, zarr or wds,zarr")
        if self.crop == "center" and self.views > 1:
            raise HdistillError(f"--crop center gives one view per image; --views {self.views} would store it "
                                f"{self.views} times (use --views 1)")
        check_formats(parse_encodings(self.encodings), self.formats)
        if self.pixels == "jpeg" and "zarr" in self.formats:
            raise HdistillError("--pixels jpeg (the default) is written in --format wds only (a JPEG per sample is a "
                                "tar member); give --pixels raw for a zarr store")
        for name, value in [("--views", self.views), ("--batch-size", self.batch_size),
                            ("--shard-size", self.shard_size), ("--image-size", self.image_size)]:
            if value < 1:
                raise HdistillError(f"{name} must be at least 1, got {value}")
        for option_name, roles in [("--model", self.models), ("--model-arg", self.model_args),
                                   ("--weights", self.weights)]:
            extra = set(roles) - set(self.teachers)
            if extra:
                raise HdistillError(f"{option_name} names {', '.join(sorted(extra))}, which is not among --teachers "
                                    f"({', '.join(self.teachers)})")
        missing = [r for r in self.teachers if r not in self.weights]
        if missing and not self.random_init:
            raise HdistillError(
                f"no weights for teacher(s) {', '.join(missing)}: pass --weights ROLE=hub to fetch the model's "
                "pretrained tag, --weights ROLE=PATH for a local file, or --random-init for random weights")
        if self.random_init and self.weights:
            raise HdistillError("--random-init and --weights exclude each other")


@dataclass
class Runtime(ProgressOutput):
    """How this process runs; does not change the store's content (left out of STORE/config.yaml)."""

    device: str = option("auto", DEVICE_HELP)
    workers: int | None = option(None, type=click.IntRange(min=0),
                                 help="Image decoding processes (default: 4, never more than the CPUs available).")
    rank: int | None = option(None, "This process's rank for array jobs (default: $RANK or 0).", type=int)
    world_size: int | None = option(None, "Number of ranks (default: $WORLD_SIZE or 1).", type=int)
    retry: Retry = read_retries_option()          # reads of images on object storage
    quiet: bool = quiet_option()
    dry_run: bool = option(False, is_flag=True,
                           help="Print the store's size and the reads it needs per GPU, then stop before any teacher "
                                "runs or anything is written.")
    log_every_s: float = 30.0                     # seconds between progress lines (when stderr is not a terminal)

    def resolved(self) -> "Runtime":
        """The device, workers and rank this process uses (see common.runtime)."""
        rank, world_size = process_rank(self.rank, self.world_size)
        return replace(self, device=resolve_device(self.device), workers=loader_workers(self.workers), rank=rank,
                       world_size=world_size)
