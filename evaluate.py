"""`hdistill eval`: a quick quality number for a student or teacher, without downstream frameworks.

Features: the CLS token (or the mean of the patch tokens) after the final norm, on a centre view
(shorter side resized to size / 0.875, centre crop, bicubic). Split: in each class of the
ImageFolder, images in sorted order, every fifth (positions 4, 9, ...) is validation.
  kNN          cosine similarity, k = 20 neighbours voting with weights exp(sim / 0.07) (as DINO)
  linear probe a linear classifier on standardised features, full-batch L-BFGS with weight
               decay, seeded
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hdistill.common.errors import HdistillError
from hdistill.precompute.data import IMAGE_EXTENSIONS
from hdistill.precompute.image import load_image
from hdistill.precompute.teachers import Teacher


@dataclass
class Split:
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    classes: list[str]


def labelled_split(root: str, every: int = 5) -> Split:
    if not os.path.isdir(root):
        raise HdistillError(f"--data {root}: not a folder (expected an ImageFolder: one sub-folder per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    train, val = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        for i, f in enumerate(files):
            (val if i % every == every - 1 else train).append((os.path.join(root, name, f), label))
    if len(classes) < 2 or not train or not val:
        raise HdistillError(f"--data {root}: needs at least 2 class folders and {every} images in some class "
                            f"(found {len(classes)} classes, {len(train)} train and {len(val)} validation images)")
    return Split(train, val, classes)


def centre_view(path: str, size: int) -> np.ndarray:
    img = load_image(path)
    scale = size / 0.875 / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@torch.inference_mode()
def extract(model: Teacher, items: list[tuple[str, int]], pool: str = "cls", batch: int = 32) -> torch.Tensor:
    feats = []
    for start in range(0, len(items), batch):
        pixels = torch.from_numpy(np.stack([centre_view(p, model.info.image_size) for p, _ in items[start:start + batch]]))
        tokens = model.tokens(model.preprocess(pixels)).float()
        feats.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).cpu())
    return torch.cat(feats)


def knn_top1(train_f, train_y, val_f, val_y, k: int = 20, temperature: float = 0.07) -> float:
    sims = F.normalize(val_f, dim=1) @ F.normalize(train_f, dim=1).T               # [V, T]
    top, idx = sims.topk(min(k, len(train_f)), dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    votes = torch.zeros(len(val_f), classes, dtype=top.dtype).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return (votes.argmax(1) == val_y).double().mean().item()


def linear_probe_top1(train_f, train_y, val_f, val_y, weight_decay: float = 1e-4, seed: int = 0) -> float:
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x_train, x_val = (train_f - mean) / std, (val_f - mean) / std
    classes = int(max(train_y.max(), val_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x_train.shape[1], classes).double()
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x_train.double()), train_y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (layer(x_val.double()).argmax(1) == val_y).double().mean().item()


def run_eval(model: Teacher, data: str, pool: str = "cls", k: int = 20) -> dict:
    if pool not in ("cls", "mean"):
        raise HdistillError(f"--pool {pool!r}: choose cls or mean")
    split = labelled_split(data)
    train_f, val_f = extract(model, split.train, pool), extract(model, split.val, pool)
    train_y = torch.tensor([y for _, y in split.train])
    val_y = torch.tensor([y for _, y in split.val])
    return {"classes": len(split.classes), "train": len(split.train), "val": len(split.val), "pool": pool,
            "knn_top1": knn_top1(train_f.double(), train_y, val_f.double(), val_y, k),
            "linear_top1": linear_probe_top1(train_f, train_y, val_f, val_y)}
