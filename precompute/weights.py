"""Teacher weights, loaded strictly: every tensor a teacher's targets use comes from its weights, or the load stops.

Weights come from exactly one source per teacher, chosen by the user:
    WeightSource("hub")        the model's hub tag (the only path that downloads)
    WeightSource("file", path) a local file, loaded through timm's / open_clip's own pretrained path
                               (key conversion of the original checkpoint layouts)
    WeightSource("random", seed=...)  random weights, recorded as such in every output

A timm teacher is built with the classifier head of its model's own pretrained config (CLIP 512, DeiT 1000; none
for MAE, DINO and DINOv2), so that timm loads the weights strictly: every key of the model from the weights, every
key of the weights into the model. A file without a head then loads, strictly too, into the model without one.
The head is dropped afterwards (a teacher gives tokens) and the log says so. open_clip loads a whole CLIP strictly
itself. A refusal names what is missing or left over, block ranges summarised ("blocks.6-11: 72 tensors").

A position embedding is resampled only from the grid of the model's own config to the run's image size (DINOv2's
37x37 at 518 px to 16x16 at 224 px), and the log says so; weights of another grid, or of another patch size, are
refused before anything is built, and so before any shard is written.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.files import file_sha256
from hdistill.common.strict_load import LoadProblem


@dataclass(frozen=True)
class WeightSource:
    kind: str                  # "hub" | "file" | "random"
    path: str | None = None
    seed: int = 0

    @classmethod
    def parse(cls, value: str) -> "WeightSource":
        return cls("hub") if value == "hub" else cls("file", path=value)

    def describe(self, model: str) -> str:
        return f"weight file {self.path}" if self.kind == "file" else f"hub weights of {model}"


def weights_record(weights: WeightSource, hub_tag: str | None) -> dict:
    """How the manifest records a teacher's weights."""
    if weights.kind == "file":
        return {"source": "file", "path": weights.path, "sha256": file_sha256(weights.path)}
    if weights.kind == "hub":
        return {"source": "hub", "tag": hub_tag}
    return {"source": "random-init", "seed": weights.seed}


@contextmanager
def seeded(weights: WeightSource):
    """Random weights are a function of the teacher's seed alone: the model is built under torch's RNG seeded with
    it, and the caller's RNG does not move."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed)
        yield


def note(role: str, text: str):
    """What a load adapted, on stderr (the store records the weights' digest; this says what was done with them)."""
    print(f"teacher {role!r}: {text}", file=sys.stderr)


# ---------------------------------------------------------------- the file, before any model is built

def check_file(role: str, weights: WeightSource):
    if weights.kind != "file":
        return
    if not os.path.isfile(weights.path):
        raise HdistillError(f"teacher {role!r}: weight file {weights.path} does not exist")
    if weights.path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(weights.path, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise HdistillError(f"teacher {role!r}: weight file {weights.path} is not a readable safetensors file "
                                f"({err}); download it again or give another --weights") from None


def file_shapes(role: str, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file, without reading its values (a torch checkpoint's nested
    `model` / `state_dict` mapping, as timm and open_clip unwrap it)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in file_tensors(role, path, "meta").items()}


def file_tensors(role: str, path: str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a torch checkpoint's nested `model` / `state_dict` mapping unwrapped, as timm
    and open_clip do; `map_location` "meta" reads the shapes alone)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is named with its cause
        first = str(err).splitlines()[0] if str(err) else ""
        raise HdistillError(f"teacher {role!r}: weight file {path} is not a readable checkpoint "
                            f"({type(err).__name__}: {first})") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}


def _find(shapes: dict[str, tuple[int, ...]], suffixes: tuple[str, ...]) -> tuple[str, tuple[int, ...]] | None:
    """The one tensor of the image tower whose name ends with one of `suffixes` (a decoder's is not)."""
    found = [(k, s) for k, s in shapes.items() if k.endswith(suffixes) and "decoder" not in k and
             not k.startswith(("text.", "transformer."))]
    return found[0] if len(found) == 1 else None


PATCH_EMBEDS = ("patch_embed.proj.weight", "visual.conv1.weight")
POS_EMBEDS = ("pos_embed", "visual.positional_embedding")


@dataclass(frozen=True)
class Grid:
    """What a model's patch and position embeddings take: its patch size, the position tokens ahead of the patches,
    its own config's image size, and the run's."""

    patch: int
    prefix: int                # position-embedding tokens ahead of the patches (CLS; 0 for no_embed_class)
    config_size: int
    image_size: int

    def tokens(self, size: int) -> int:
        return self.prefix + (size // self.patch) ** 2

    def side(self, tokens: int) -> int:
        return round((tokens - self.prefix) ** 0.5)


def check_grid(role: str, model: str, weights: WeightSource, grid: Grid, shapes: dict | None) -> str | None:
    """Refuse weights cut for another patch size, or with a position embedding of a grid that is neither the
    run's nor the model config's; -> what to say when the embedding is resampled from the config's grid to the
    run's. `shapes` None: the model's own hub weights (of its config's grid)."""
    what = weights.describe(model)
    if shapes is not None:
        patch = _find(shapes, PATCH_EMBEDS)
        if patch is not None and tuple(patch[1][-2:]) != (grid.patch, grid.patch):
            raise HdistillError(f"teacher {role!r}: {what}: their patch embedding ({patch[0]}) cuts "
                                f"{patch[1][-2]}x{patch[1][-1]} px patches, model {model} cuts {grid.patch}x"
                                f"{grid.patch} px; resampling a patch embedding changes the teacher: give the model "
                                "of these weights (--model ROLE=NAME)")
        pos = _find(shapes, POS_EMBEDS)
        tokens = pos[1][-2] if pos is not None else grid.tokens(grid.config_size)
        if tokens == grid.tokens(grid.image_size):
            return None
        if tokens != grid.tokens(grid.config_size):
            raise HdistillError(
                f"teacher {role!r}: {what}: their position embedding ({pos[0]}) holds {tokens} tokens, neither the "
                f"{grid.side(grid.tokens(grid.image_size))}x{grid.side(grid.tokens(grid.image_size))} grid of "
                f"--image-size {grid.image_size} nor the {grid.config_size} px grid of {model}'s own config; give "
                "the model these weights were trained as (--model ROLE=NAME), whose config says their image size")
    if grid.config_size == grid.image_size:
        return None
    side, config_side = grid.image_size // grid.patch, grid.config_size // grid.patch
    return (f"position embedding resampled from the {config_side}x{config_side} grid of the model's "
            f"{grid.config_size} px config to {side}x{side} for --image-size {grid.image_size}")


def refusal(role: str, model: str, weights: WeightSource, err: Exception,
            optional: set[str] = frozenset()) -> HdistillError:
    """A failed load as one line: what did not fit (missing keys in `optional` left out), and what to do."""
    problem = LoadProblem.of(err)
    if problem is not None:
        return HdistillError(f"teacher {role!r}: model {model} does not fit {weights.describe(model)}: "
                             f"{problem.describe(optional)}. Give the weights of this model, or the model of these "
                             "weights (--model ROLE=NAME, --model-arg)")
    lines = str(err).strip().splitlines()
    detail = " ".join(line.strip() for line in lines[:6])[:600]
    where = " (the hub needs network access: on a machine without it, download the weights elsewhere and give " \
            "--weights ROLE=PATH)" if weights.kind == "hub" else ""
    return HdistillError(f"teacher {role!r}: cannot load {weights.describe(model)} into model {model} "
                         f"({type(err).__name__}: {detail}){where}")


# ---------------------------------------------------------------- the two libraries

def load_timm(role: str, name: str, weights: WeightSource, probe, image_size: int, kwargs: dict):
    """A timm model with its weights, strictly loaded (see the module docstring), its classifier head dropped.
    `probe`: the architecture built on the meta device (its config, patch and prefix tokens)."""
    import timm

    def create(**more):
        try:
            return timm.create_model(name, img_size=image_size, **more, **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            if weights.kind == "random":
                raise HdistillError(f"teacher {role!r}: cannot build timm model {name!r} with {kwargs}: {err}") \
                    from None
            raise refusal(role, name, weights, err) from None

    if weights.kind == "random":
        with seeded(weights):
            return create(pretrained=False, num_classes=0)
    prefix = 0 if getattr(probe, "no_embed_class", False) else probe.num_prefix_tokens
    grid = Grid(probe.patch_embed.patch_size[0], prefix, probe.pretrained_cfg["input_size"][-1], image_size)
    resampled = check_grid(role, name, weights, grid, file_shapes(role, weights.path) if weights.kind == "file" else None)
    overlay = dict(file=weights.path) if weights.kind == "file" else {}
    try:       # with the head of the model's config, so timm does not adapt it away and loads strictly
        model = timm.create_model(name, pretrained=True, img_size=image_size, pretrained_cfg_overlay=overlay,
                                  **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        heads = _head_keys(probe)
        classes = _their_head(LoadProblem.of(err), heads)
        if classes is None:
            raise refusal(role, name, weights, err, optional=heads) from None
        # the weights hold another head, or none: the model with theirs, loaded strictly too
        model = create(pretrained=True, num_classes=classes, pretrained_cfg_overlay={**overlay, "num_classes": classes})
    heads = {k: list(v.shape) for k, v in model.state_dict().items() if k in _head_keys(model)}
    if model.num_classes:
        model.reset_classifier(0)
        note(role, f"its weights' classifier head ({', '.join(f'{k} {s}' for k, s in heads.items())}) is loaded and "
                   "dropped: a teacher gives tokens")
    if resampled:
        note(role, resampled)
    return model


def _their_head(problem: LoadProblem | None, heads: set[str]) -> int | None:
    """The classes of the weights' own head when only the head kept a load from being strict: 0 for weights without
    one, the rows of theirs for a head of another size; None when anything else does not fit."""
    if problem is None or problem.unexpected or not (problem.missing or problem.mismatched):
        return None
    if problem.missing and not problem.mismatched and set(problem.missing) <= heads:
        return 0
    if not problem.missing and {key for key, _, _ in problem.mismatched} <= heads:
        rows = [int(theirs.strip("[]").split(",")[0]) for key, theirs, _ in problem.mismatched
                if key.endswith(".weight")]
        return rows[0] if rows else None
    return None


def _head_keys(model) -> set[str]:
    """The state keys of a timm model's classifier head(s), as its pretrained config names them."""
    names = model.pretrained_cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in model.state_dict() if k.split(".")[0] in names}


def load_open_clip(role: str, arch: str, tag: str, weights: WeightSource, image_size: int, kwargs: dict):
    """An open_clip CLIP with its weights (open_clip loads the whole model strictly), at `image_size`."""
    import open_clip

    vision = open_clip.get_model_config(arch)["vision_cfg"]
    patch = vision["patch_size"] if isinstance(vision["patch_size"], int) else vision["patch_size"][0]
    config_size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    pretrained, resampled = None, None
    try:
        if weights.kind != "random":
            pretrained = tag if weights.kind == "hub" else weights.path
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag)) if weights.kind == "hub" \
                else weights.path
            resampled = check_grid(role, f"open_clip:{arch}", weights, Grid(patch, 1, config_size, image_size),
                                   file_shapes(role, path))
        with seeded(weights):
            clip = open_clip.create_model(arch, pretrained=pretrained, force_image_size=image_size, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise refusal(role, f"open_clip:{arch}", weights, err) from None
    if resampled:
        note(role, resampled)
    return clip
