"""Attention distance and NMI against hand-computed values; analyze and a reduced demo end to end."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tinymodels import ASSETS
from hdistill.analyze import attention_distance, attention_nmi, patch_attention
from hdistill.cli import cli

D = 16 * math.sqrt(2)  # diagonal neighbour on a 2x2 grid of 16 px patches


def as_batch(attn):
    return torch.tensor(np.ascontiguousarray(attn), dtype=torch.float64)[None, None]  # [1, 1, N, N]


def test_distance_of_uniform_identity_and_neighbour_attention():
    uniform = np.full((4, 4), 0.25)
    assert attention_distance(as_batch(uniform), 16).item() == pytest.approx((0 + 16 + 16 + D) / 4)
    assert attention_distance(as_batch(np.eye(4)), 16).item() == pytest.approx(0.0)
    right_or_left = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]  # each patch looks at its row neighbour
    assert attention_distance(as_batch(right_or_left), 16).item() == pytest.approx(16.0)
    diagonal = np.fliplr(np.eye(4))  # 0<->3 and 1<->2 on the 2x2 grid: all diagonal
    assert attention_distance(as_batch(diagonal), 16).item() == pytest.approx(D)


def test_nmi_of_uniform_identity_and_a_mixture():
    assert attention_nmi(as_batch(np.full((4, 4), 0.25))).item() == pytest.approx(0.0, abs=1e-9)
    assert attention_nmi(as_batch(np.eye(4))).item() == pytest.approx(1.0)
    assert attention_nmi(as_batch(np.eye(4)[[1, 0, 3, 2]])).item() == pytest.approx(1.0)  # a permutation
    # half on itself, half on patch 0: computed with plain loops
    attn = 0.5 * np.eye(4)
    attn[:, 0] += 0.5
    n = 4
    p_k = [sum(attn[q][k] for q in range(n)) / n for k in range(n)]
    mutual = sum(attn[q][k] / n * math.log(attn[q][k] / p_k[k]) for q in range(n) for k in range(n) if attn[q][k] > 0)
    h_k = -sum(p * math.log(p) for p in p_k)
    assert attention_nmi(as_batch(attn)).item() == pytest.approx(mutual / math.sqrt(math.log(n) * h_k))


def test_patch_attention_drops_cls_and_renormalises():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64) * 3
    attn = patch_attention(raw, head_dim=4)
    soft = torch.softmax(raw / 2.0, dim=-1)
    expected = soft[:, :, 1:, 1:] / soft[:, :, 1:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(attn, expected)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 4, dtype=torch.float64))


def test_reduced_demo_leaves_its_files(tmp_path, monkeypatch):
    import hdistill.analyze as analyze
    captions, caption = [], analyze._caption
    monkeypatch.setattr(analyze, "_caption", lambda fig, note: captions.append(note) or caption(fig, note))
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--num-images", "16", "--steps", "10"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output
    # every figure of the analysis says that the teachers' attention is that of random weights
    assert captions == ["mae, clip: RANDOM weights, no learned attention"] * 3
    demo = tmp_path / "demo"
    for path in ("store/manifest.json", "run/metrics.jsonl", "run/student.safetensors",
                 "loss.png", "analysis/attention.csv", "analysis/attention.json", "analysis/attention_distance.png",
                 "analysis/nmi.png", "analysis/attention_maps.png"):
        assert (demo / path).exists(), path
    rows = (demo / "analysis" / "attention.csv").read_text().splitlines()
    assert rows[0] == "model,layer,head,distance_px,nmi" and len(rows) == 1 + 3 * 6 * 3  # 3 models x 6 layers x 3 heads


@pytest.mark.skipif(not (ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors").exists(),
                    reason="../shared/assets not present")
def test_analyze_a_real_teacher_on_real_images(tmp_path):
    weights = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
    result = CliRunner().invoke(cli, ["analyze", "--out", str(tmp_path), "--teachers", "dino",
                                      "--model", "dino=vit_small_patch14_dinov2", "--weights", f"dino={weights}",
                                      "--data", str(ASSETS / "imagenet-sample-100"), "--count", "4"])
    assert result.exit_code == 0, result.output
    import json
    stats = json.loads((tmp_path / "attention.json").read_text())
    assert len(stats) == 12 and all(len(s["distance"]) == 6 for s in stats)
    # this trained ViT has strongly local heads in its early layers (about 20 px, uniform attention gives 117 px),
    # and a local head attends to different keys for different queries: its NMI is high
    uniform = attention_distance(torch.full((1, 1, 256, 256), 1 / 256, dtype=torch.float64), 14).item()
    heads = [(d, n) for s in stats[:5] for d, n in zip(s["distance"], s["nmi"])]
    distance, nmi = min(heads)
    assert distance < 0.25 * uniform and nmi > 0.5


def test_knn_against_a_plain_loop_vote():
    from hdistill.evaluate import knn_top1
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    train_y, val_y = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (8,), generator=g)
    correct = 0
    for v in range(8):
        sims = [float(val_f[v] @ train_f[t] / (val_f[v].norm() * train_f[t].norm())) for t in range(30)]
        nearest = sorted(range(30), key=lambda t: -sims[t])[:5]
        votes = [0.0, 0.0, 0.0]
        for t in nearest:
            votes[int(train_y[t])] += math.exp(sims[t] / 0.07)
        correct += int(np.argmax(votes) == int(val_y[v]))
    assert knn_top1(train_f, train_y, val_f, val_y, k=5) == pytest.approx(correct / 8)


def test_eval_separates_two_visibly_different_classes(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (tmp_path / label).mkdir()
        for i in range(10):
            noise = rng.integers(-40, 40, (48, 64, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(tmp_path / label / f"{i}.png")
    result = CliRunner().invoke(cli, ["eval", "--data", str(tmp_path), "--teachers", "dino", "--random-init",
                                      "--model", "dino=vit_small_patch16_224", "--model-arg", "dino.depth=2",
                                      "--model-arg", "dino.embed_dim=48", "--model-arg", "dino.num_heads=3",
                                      "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert "2 classes, 16 train / 4 val images" in result.output
    assert "kNN top-1 100.0%, linear probe top-1 100.0%" in result.output


def labelled_folder(root, size=(48, 64)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(5):
            noise = rng.integers(-40, 40, (*size, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
    return root


def test_eval_builds_students_from_their_files_alone_and_names_them_by_path(tmp_path):
    from hdistill.train.student import build_student, export_student
    paths = []
    for i, depth in enumerate((2, 3)):
        torch.manual_seed(i)
        student = build_student("vit_small_patch16_224", 64, dict(depth=depth, embed_dim=48, num_heads=3))
        paths.append(str(export_student(student, tmp_path / f"run{i}" / "student.safetensors")))
    data = labelled_folder(tmp_path / "data")
    result = CliRunner().invoke(cli, ["eval", "--data", str(data), "--student-weights", paths[0], "--student-weights", paths[1]])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("eval ")]
    assert [line.split(":")[0] for line in lines] == [f"eval {p}" for p in paths]
    assert all(" val images at 64 px, cls features" in line for line in lines)
    # the argument train accepts is accepted here too
    result = CliRunner().invoke(cli, ["eval", "--data", str(data), "--student-weights", paths[0], "--student-arg", "img_size=64"])
    assert result.exit_code == 0, result.output
    # the wrong architecture: counts and first keys, not torch's whole key list
    result = CliRunner().invoke(cli, ["eval", "--data", str(data), "--student-weights", paths[1], "--student-arg", "depth=2"])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert "does not fit timm model vit_small_patch16_224" in message and \
        "in the weights but not in the model: blocks.2: 12 tensors" in message
    assert len(message) < 500


def test_attention_map_layers_are_each_models_first_middle_and_last():
    from types import SimpleNamespace

    from hdistill.analyze import map_layers
    from hdistill.common.errors import HdistillError
    models = {"mae": SimpleNamespace(info=SimpleNamespace(depth=12)),
              "student": SimpleNamespace(info=SimpleNamespace(depth=4))}
    assert map_layers(models, None) == {"mae": [0, 6, 11], "student": [0, 2, 3]}
    assert map_layers(models, [0, -1]) == {"mae": [0, 11], "student": [0, 3]}
    with pytest.raises(HdistillError, match="--layers 0,5: student has 4 blocks"):
        map_layers(models, [0, 5])
