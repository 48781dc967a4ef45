"""`hdistill analyze`: the paper's diagnostics of attention, for teachers and trained students.

Per layer and head, over a set of images (paper Sec. 2.1, Fig. 1, 2 and 5):
  distance  average attention distance in pixels: for each query patch, the attention-weighted
            mean distance to the key patches (centre to centre), averaged over queries and images
            (as in ViT and FD). CLS is excluded as query and as key; each query's attention over
            the patch keys is renormalised to sum to 1.
  nmi       normalised mutual information between query and key: p(q) = 1/N uniform, p(k|q) the
            attention, p(k) = mean_q p(k|q); NMI = I(q, k) / sqrt(H(q) H(k)), over the patch tokens
            (CLS excluded and rows renormalised, as for the distance), averaged over images.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.precompute.data import list_images
from hdistill.precompute.image import decode_image
from hdistill.precompute.teachers import Teacher, TimmTeacher, timm_info
from hdistill.precompute.view import make_view
from hdistill.train.student import load_export


def patch_attention(relations: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Raw Q K^T [B, H, 1+N, 1+N] -> attention among patches [B, H, N, N], rows summing to 1."""
    attn = torch.softmax(relations.double() / math.sqrt(head_dim), dim=-1)[:, :, 1:, 1:]
    return attn / attn.sum(-1, keepdim=True)


def patch_distances(grid: int, patch: int) -> torch.Tensor:
    """[N, N] pixel distances between patch centres on a grid x grid layout."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], 1).double() * patch
    return torch.cdist(centres, centres)


def attention_distance(attn: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch attention [B, H, N, N] -> mean attention distance per head [H], in pixels."""
    grid = int(round(math.sqrt(attn.shape[-1])))
    dist = patch_distances(grid, patch).to(attn.device)
    return (attn * dist).sum(-1).mean(dim=(0, 2))


def attention_nmi(attn: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Patch attention [B, H, N, N] (rows p(k|q)) -> NMI per head [H], averaged over the batch."""
    N = attn.shape[-1]
    p_k = attn.mean(-2, keepdim=True)                                        # [B, H, 1, N]
    mutual = (attn * (torch.log(attn + eps) - torch.log(p_k + eps))).sum(-1).mean(-1)  # [B, H]
    h_q = math.log(N)
    h_k = -(p_k * torch.log(p_k + eps)).sum(-1).squeeze(-1)                  # [B, H]
    return (mutual / torch.sqrt(h_q * h_k).clamp_min(eps)).mean(0)


@dataclass
class LayerStats:
    model: str
    layer: int
    distance: list[float]      # per head, pixels
    nmi: list[float]           # per head


def load_views(data: str, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """The first `count` images of `data` as view 0 under `seed`: uint8 [B, S, S, 3]."""
    views = []
    for ref in list_images(data, count):
        views.append(make_view(decode_image(ref.read(), ref.source), ref.image_id, 0, seed, size)[0])
    return torch.from_numpy(np.stack(views))


def student_as_teacher(path: str, name: str | None = None, image_size: int | None = None,
                       kwargs: dict | None = None) -> Teacher:
    """A trained student (student.safetensors, loaded back by train.student.load_export), wrapped for analysis."""
    model, name, image_size = load_export(path, name, image_size, kwargs)
    return TimmTeacher(timm_info("student", name, model, {"source": "file", "path": path}, image_size), model)


@torch.inference_mode()
def layer_attention(model: Teacher, pixels: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    """Patch attention of every layer, [images, H, N, N] each (computed batch by batch)."""
    depth, heads = model.info.depth, model.info.heads
    head_dim = model.info.width // heads
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    for start in range(0, len(pixels), batch):
        captured = {}
        handles = [model.tap("rel", b, lambda r, b=b: captured.__setitem__(b, r))
                   for b in range(depth)]
        try:
            model.tokens(model.preprocess(pixels[start:start + batch]))
        finally:
            for h in handles:
                h.remove()
        for b in range(depth):
            per_layer[b].append(patch_attention(captured[b], head_dim).cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def analyze_model(label: str, model: Teacher, pixels: torch.Tensor) -> tuple[list[LayerStats], list[torch.Tensor]]:
    attention = layer_attention(model, pixels)
    stats = [LayerStats(label, i, attention_distance(a, model.info.patch_size).tolist(), attention_nmi(a).tolist())
             for i, a in enumerate(attention)]
    return stats, attention


def write_tables(stats: list[LayerStats], out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attention.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "layer", "head", "distance_px", "nmi"])
        for s in stats:
            for h, (d, n) in enumerate(zip(s.distance, s.nmi)):
                writer.writerow([s.model, s.layer, h, f"{d:.4f}", f"{n:.6f}"])
    (out / "attention.json").write_text(json.dumps([s.__dict__ for s in stats], indent=1))


def random_weights_note(models: dict[str, Teacher]) -> str | None:
    """What the figures must say when a model's weights are random (the demo's teachers, --random-init): its
    attention carries no learned content."""
    random = [label for label, m in models.items() if m.info.weights.get("source") == "random-init"]
    return f"{', '.join(random)}: RANDOM weights, no learned attention" if random else None


def _caption(fig, note: str | None):
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", color="tab:red", fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))


def plot_distance_and_nmi(stats: list[LayerStats], out: Path, note: str | None = None) -> list[Path]:
    """Fig. 1 / 5 style: head distances per layer (scatter), one panel per model; NMI per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    models = list(dict.fromkeys(s.model for s in stats))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], models):
        for s in (s for s in stats if s.model == name):
            ax.scatter([s.layer + 1] * len(s.distance), s.distance, s=14, alpha=0.8, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average attention distance (px)")
    fig.tight_layout()
    _caption(fig, note)
    distance_png = out / "attention_distance.png"
    fig.savefig(distance_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    # equal curves (the same model in two roles) stay visible: each model its own line style, marker and size
    styles = [("-", "o", 9), ("--", "s", 5.5), (":", "^", 4), ("-.", "D", 3)]
    for i, name in enumerate(models):
        layers = [s for s in stats if s.model == name]
        line, marker, size = styles[i % len(styles)]
        ax.plot([s.layer + 1 for s in layers], [float(np.mean(s.nmi)) for s in layers], linestyle=line,
                marker=marker, markersize=size, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("NMI (query, key)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _caption(fig, note)
    nmi_png = out / "nmi.png"
    fig.savefig(nmi_png, dpi=120)
    plt.close(fig)
    return [distance_png, nmi_png]


def plot_attention_maps(attention: dict[str, list[torch.Tensor]], pixels: torch.Tensor, query: int,
                        layers: dict[str, list[int]], out: Path, note: str | None = None) -> Path:
    """Attention of one query patch (marked) of the first image, at each model's chosen layers (head mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(attention)
    columns = max(len(v) for v in layers.values())
    fig, axes = plt.subplots(len(names), columns + 1, figsize=(2.4 * (columns + 1), 2.5 * len(names)),
                             squeeze=False)
    image = pixels[0].numpy()
    for r, name in enumerate(names):
        grid = int(round(math.sqrt(attention[name][0].shape[-1])))
        qr, qc = divmod(query, grid)
        cell = image.shape[0] / grid
        axes[r][0].imshow(image)
        axes[r][0].add_patch(plt.Rectangle((qc * cell, qr * cell), cell, cell, fill=False, color="red", lw=2))
        axes[r][0].set_title(f"{short_label(name)}\nquery patch {query}", fontsize=8)
        for c, layer in enumerate(layers[name], start=1):
            amap = attention[name][layer][0].mean(0)[query].reshape(grid, grid).numpy()
            axes[r][c].imshow(amap, cmap="viridis")
            axes[r][c].set_title(f"layer {layer + 1}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r][len(layers[name]) + 1:]:      # a model with fewer layers shown than the widest row
            ax.axis("off")
    fig.tight_layout()
    _caption(fig, note)
    path = out / "attention_maps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def map_layers(models: dict[str, Teacher], layers: list[int] | None) -> dict[str, list[int]]:
    """The attention-map layers of each model: `layers` (0-indexed, negative from the end) for all, or by default
    each model's first, middle and last block."""
    chosen = {}
    for name, model in models.items():
        depth = model.info.depth
        if layers is None:
            chosen[name] = sorted({0, depth // 2, depth - 1})
            continue
        outside = [b for b in layers if not -depth <= b < depth]
        if outside:
            raise HdistillError(f"--layers {','.join(map(str, layers))}: {name} has {depth} blocks (0..{depth - 1})")
        chosen[name] = [b % depth for b in layers]
    return chosen


def short_label(name: str) -> str:
    """A model's label as a figure's panel fits it: a student's path by its last two parts, one a line."""
    return "/\n".join(Path(name).parts[-2:])


def run_analysis(models: dict[str, Teacher], data: str, count: int, out: str, query: int | None = None,
                 layers: list[int] | None = None, seed: int = 0) -> list[Path]:
    """Analyse each model on the same views; write the table and figures; return the written files."""
    out_dir = Path(out)
    sizes = {m.info.image_size for m in models.values()}
    if len(sizes) != 1:
        raise HdistillError(f"models to compare take different image sizes {sorted(sizes)}")
    pixels = load_views(data, count, sizes.pop(), seed)
    stats, attention = [], {}
    for label, model in models.items():
        s, attention[label] = analyze_model(label, model, pixels)
        stats += s
    write_tables(stats, out_dir)
    note = random_weights_note(models)
    files = [out_dir / "attention.csv", out_dir / "attention.json", *plot_distance_and_nmi(stats, out_dir, note)]
    grid = next(iter(models.values())).info.grid
    query = grid.num_patches // 2 + grid.side // 2 if query is None else query
    if not 0 <= query < grid.num_patches:
        raise HdistillError(f"--query {query}: patch index out of range (0..{grid.num_patches - 1})")
    files.append(plot_attention_maps(attention, pixels, query, map_layers(models, layers), out_dir, note))
    return files
