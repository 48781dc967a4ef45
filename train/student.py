"""The student: any timm ViT, randomly initialised, fed CLS plus the kept patches only.

Like the MAE encoder, the student embeds only the stored (kept) patches: the patch embedding
is applied to their exact pixels and the position embeddings are gathered at their indices.
What the loss compares at inner blocks is captured by hooks registered once (`capture`), so every
block still runs fused attention (SDPA): Q K^T from a block's own qkv Linear output (computed in
float32, also under bf16 autocast), the residual stream after a block, a block's attention output
(softmax(Q K^T / sqrt(d)) V, heads concatenated, before the output projection). A trained student is exported
as a timm backbone (`export_student`) and built again from that file (`load_export`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hdistill.common.atomic import atomic_open
from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenGrid
from hdistill.common.strict_load import LoadProblem
from hdistill.common.taps import TIMM_TAPS
from hdistill.common.tokens import gather_rows

from .config import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class StudentOutput:
    """tokens: last block after the final norm [B, 1+n, D]; taps: (kind, block) -> captured tensor:
    ("rel", b) raw Q K^T [B, H, 1+n, 1+n], ("feat", b) residual stream [B, 1+n, D] and ("msa", b) attention
    output before the output projection [B, 1+n, A]."""

    tokens: torch.Tensor
    taps: dict[tuple[str, int], torch.Tensor]



class Student(nn.Module):
    def __init__(self, name: str, model: nn.Module, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 model_args: dict | None = None):
        super().__init__()
        self.name, self.model, self.image_size = name, model, image_size
        self.model_args = dict(model_args or {})       # timm constructor arguments besides img_size
        self.input_mean, self.input_std = tuple(mean), tuple(std)
        self.register_buffer("mean", torch.tensor(self.input_mean).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.input_std).view(1, 1, 3, 1, 1), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def heads(self) -> int:
        return self.model.blocks[0].attn.num_heads

    @property
    def width(self) -> int:
        return self.model.embed_dim

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.image_size, self.model.patch_embed.patch_size[0])

    def embed(self, pixels: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """uint8 kept patches [B, n, P, P, 3] + their indices [B, n] -> tokens [B, 1+n, D] with positions."""
        m = self.model
        x = pixels.permute(0, 1, 4, 2, 3).float().div(255)                 # [B, n, 3, P, P]
        x = ((x - self.mean) / self.std).flatten(2)                          # [B, n, 3*P*P]
        proj = m.patch_embed.proj                                           # Conv2d with kernel = stride = P
        x = m.patch_embed.norm(F.linear(x, proj.weight.flatten(1), proj.bias))  # [B, n, D]
        pos = m.pos_embed.expand(x.shape[0], -1, -1)                         # [B, 1+N, D]
        x = x + gather_rows(pos[:, 1:], keep_idx)
        cls = m.cls_token.expand(x.shape[0], -1, -1) + pos[:, :1]
        return torch.cat([cls, x], dim=1)

    def capture(self, taps):
        """From now on, every forward also returns the (kind, block) tensors of `taps` (hooks registered
        once, so torch.compile sees them from the start)."""
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        for kind, block in taps:
            TIMM_TAPS[kind](self.model.blocks[block], functools.partial(self._captured.__setitem__, (kind, block)))

    def freeze_unreached(self, taps, final: bool) -> list[str]:
        """Freeze (requires_grad False) the parameters that neither the captured `taps` nor, with `final`, the final
        tokens depend on, and return their names. Found by one backward through a probe forward in eval mode, so
        stochastic depth drops no block and no random number is drawn. A relation-only objective at block B, say,
        leaves block B's projection and MLP and every later block untouched: frozen, they keep their initial
        values (no weight decay, no optimiser state) and stay out of DDP's reduction."""
        was_training = self.training
        self.eval()
        try:
            n = min(4, self.grid.num_patches)
            patch = self.grid.patch_size
            pixels = torch.zeros(1, n, patch, patch, 3, dtype=torch.uint8, device=self.mean.device)
            out = self(pixels, torch.arange(n, device=self.mean.device)[None])
            used = [out.taps[tap] for tap in taps] + ([out.tokens] if final else [])
            torch.autograd.backward([t.float().sum() for t in used])
        finally:
            self.train(was_training)
        frozen = []
        for name, p in self.model.named_parameters():
            if p.grad is None:
                p.requires_grad_(False)
                frozen.append(name)
            p.grad = None
        return frozen

    def modules_of(self, names: list[str]) -> str:
        """Parameter names by module, a block whose parameters are all named as one: "blocks.2.mlp, blocks.3, norm"."""
        named, modules = set(names), []
        for name in names:
            parts = name.split(".")
            block = ".".join(parts[:2]) if parts[0] == "blocks" else None
            whole = block is not None and all(n in named for n, _ in self.model.named_parameters()
                                               if n.startswith(block + "."))
            modules.append(block if whole else ".".join(parts[:3] if parts[0] == "blocks" else parts[:-1]) or name)
        return ", ".join(dict.fromkeys(modules))

    def forward(self, pixels: torch.Tensor, keep_idx: torch.Tensor) -> StudentOutput:
        m = self.model
        x = m.norm_pre(self.embed(pixels, keep_idx))
        tokens = m.norm(m.blocks(x))
        captured = getattr(self, "_captured", {})
        taps = dict(captured)
        captured.clear()
        return StudentOutput(tokens=tokens, taps=taps)


def build_student(name: str, image_size: int, kwargs: dict | None = None, drop_path: float = 0.0,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Student:
    """A randomly initialised timm ViT for views of `image_size` px (the store's), with stochastic depth."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise HdistillError(f"--student: unknown timm model {name!r}")
    kwargs = dict(kwargs or {})
    try:
        with torch.device("meta"):                  # the architecture alone: no memory, no weights
            probe = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items() if k != "img_size"})
    except (TypeError, ValueError, RuntimeError) as err:
        raise HdistillError(f"--student {name} with {kwargs or {}}: {err}") from None
    if not isinstance(probe, VisionTransformer):
        raise HdistillError(f"--student {name}: a {type(probe).__name__}, not a ViT; hdistill trains timm "
                            "VisionTransformers (vit_*, deit_*, e.g. vit_base_patch16_224)")
    if kwargs.pop("img_size", image_size) != image_size:
        raise HdistillError(f"--student-arg img_size: the store's views are {image_size} px, and the student "
                            f"takes them as they are; drop the argument or give img_size={image_size}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size,
                                  drop_path_rate=drop_path, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise HdistillError(f"--student {name} with {kwargs or {}}: {err}") from None
    if not isinstance(model, VisionTransformer) or model.cls_token is None or model.num_prefix_tokens != 1 \
            or getattr(model, "no_embed_class", False) or getattr(model, "dynamic_img_size", False):
        raise HdistillError(f"--student {name}: hdistill trains timm VisionTransformers with one CLS token, "
                            "a learned position embedding for it, and a fixed image size")
    if not all(hasattr(b.attn, "qkv") and hasattr(b.attn, "norm") for b in model.blocks):
        raise HdistillError(f"--student {name}: its attention is not timm's, with a fused qkv projection to take "
                            "Q K^T and the attention output from")
    return Student(name, model, image_size, mean, std, kwargs)


# ---------------------------------------------------------------- the export (student.safetensors)

def export_student(student: Student, path: Path) -> Path:
    """The backbone's state dict (no classifier), atomically, for timm's pretrained path. Its metadata says how to
    build it again: timm_model, model_args (JSON), img_size and input_size, and the input normalisation mean/std
    (JSON lists). Equal students give equal bytes."""
    metadata = {"timm_model": student.name, "model_args": json.dumps(student.model_args, sort_keys=True),
                "img_size": str(student.image_size), "input_size": json.dumps([3, student.image_size, student.image_size]),
                "mean": json.dumps(student.input_mean), "std": json.dumps(student.input_std)}
    return save_module(student.model, metadata, path)


def save_module(module: nn.Module, metadata: dict[str, str], path: Path) -> Path:
    """A module's state dict as safetensors, atomically, with `metadata` (and "format": "pt"); equal modules give
    equal bytes."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_open(path) as f:
        f.write(_sorted_metadata(save(state, metadata={"format": "pt", **metadata})))
    return path


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors writes its __metadata__ map in hash order, which differs between processes; write it sorted.
    The header is JSON after its 8-byte length, padded with spaces to 8 bytes; tensor offsets count from its end."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


@dataclass(frozen=True)
class ExportInfo:
    """What an exported student's metadata says about it (each field None where the file does not say)."""

    timm_model: str | None
    model_args: dict
    img_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


def load_export(path: str, name: str | None = None, image_size: int | None = None,
                kwargs: dict | None = None) -> tuple[nn.Module, str, int]:
    """A student.safetensors built again through timm's pretrained path, strictly: (model, timm name, view size).
    The file's metadata says its timm model, constructor arguments, view size and input normalisation; `name`,
    `kwargs` and `image_size` override them (and are needed for a file without that metadata). At another image size
    timm resamples the position embedding."""
    import timm

    info = read_export_info(path)
    name = name or info.timm_model
    if name is None:
        raise HdistillError(f"--student-weights {path}: the file does not say which timm model it holds; give --student")
    kwargs = {**info.model_args, **(kwargs or {})}
    image_size = kwargs.pop("img_size", None) or image_size or info.img_size or 224
    norm = {k: v for k, v in (("mean", info.mean), ("std", info.std)) if v is not None}
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, img_size=image_size,
                                  pretrained_cfg_overlay=dict(file=path, num_classes=0, **norm), **kwargs)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        problem = LoadProblem.of(err)
        detail = problem.describe() if problem else str(err).splitlines()[0][:400]
        raise HdistillError(f"--student-weights {path} does not fit timm model {name} {kwargs}: {detail}; check "
                            "--student and --student-arg") from None
    return model, name, image_size


def read_export_info(path: str) -> ExportInfo:
    """The metadata of a student.safetensors; raises HdistillError naming `path` for a file that is not one."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise HdistillError(f"--student-weights {path}: not a readable safetensors file ({err}); give the "
                            "student.safetensors that hdistill train wrote") from None
    as_rgb = lambda key: tuple(json.loads(meta[key])) if key in meta else None  # noqa: E731
    return ExportInfo(meta.get("timm_model"), json.loads(meta.get("model_args", "{}")),
                      int(meta["img_size"]) if "img_size" in meta else None, as_rgb("mean"), as_rgb("std"))
