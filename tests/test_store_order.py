"""Store order: shards hold a uniform sample of the input, so an ImageFolder's classes mix in every shard.

The expectation of distinct classes in a random draw is computed here from the hypergeometric law:
drawing s of C * m images (m per class) without replacement, a class is missed with probability
comb(C*m - m, s) / comb(C*m, s).
"""
import math
from pathlib import Path

import numpy as np
import webdataset as wds

from helpers import precompute, write_photos
from hdistill.shards.format import StoreLayout


def expected_distinct(classes: int, per_class: int, draw: int) -> float:
    total = classes * per_class
    return classes * (1 - math.comb(total - per_class, draw) / math.comb(total, draw))


def layout(num_images, shard_size, seed=0):
    return StoreLayout(num_images=num_images, views=1, shard_size=shard_size, image_size=64, patch_size=16,
                       num_patches=16, stored_patches=16, order_seed=seed)


def test_every_shard_is_a_uniform_sample_of_an_imagefolder():
    classes, per_class, shard = 100, 64, 256          # input in class order, as an ImageFolder lists it
    lay = layout(classes * per_class, shard)
    assert sorted(lay.order.tolist()) == list(range(classes * per_class))
    distinct = [len({int(lay.order[p]) // per_class for p in lay.positions(k)}) for k in range(lay.shards_per_view)]
    expected = expected_distinct(classes, per_class, shard)          # about 92.4; input order would give 4 or 5
    assert abs(np.mean(distinct) - expected) < 1.0, (np.mean(distinct), expected)
    # the documented rule, reproducible with plain numpy, and a function of the seed alone
    np.testing.assert_array_equal(lay.order, np.random.default_rng(0).permutation(classes * per_class))
    assert not np.array_equal(layout(6400, 256, seed=1).order, lay.order)


def test_store_shards_mix_classes(tmp_path):
    classes, per_class, shard = 8, 6, 8
    for c in range(classes):
        write_photos(tmp_path / "folder" / f"c{c}", per_class, seed=c)   # c{c}/class{0,1}/img...jpg
    manifest, _ = precompute(tmp_path / "folder", tmp_path / "store", shard_size=shard, seed=5,
                             targets=["clip:feat"], mask_ratio=0.0)
    files = sorted(str(p.relative_to(tmp_path / "folder")) for p in (tmp_path / "folder").rglob("*.jpg"))
    order = np.random.default_rng(5).permutation(len(files))            # the manifest's rule, by hand
    assert manifest.layout.order_seed == 5 and "permutation" in manifest.to_dict()["layout"]["order_rule"]
    distinct = []
    for k, record in enumerate(manifest.shards):
        keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "store" / record.file), shardshuffle=False)]
        wanted = [files[i] for i in order[k * shard:(k + 1) * shard]]
        assert keys == [f"{Path(f).with_suffix('').as_posix().replace('.', '_')}-v0" for f in wanted]
        distinct.append(len({key.split("/")[0] for key in keys}))
    expected = expected_distinct(classes, per_class, shard)             # about 5.5; input order gives 2
    assert abs(np.mean(distinct) - expected) < 1.25, (distinct, expected)
