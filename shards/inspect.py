"""`hdistill inspect STORE`: a store's summary as lines of text, from its manifest (and its size, once complete)."""
from __future__ import annotations

from .encoding import ENCODINGS
from .format import store_bytes
from .manifest import Manifest, read_manifest
from .pixels import describe_decoder
from .size import human, size_lines, store_view_bytes


def _weights(w: dict) -> str:
    return {"file": f"file {w.get('path')} sha256 {str(w.get('sha256'))[:12]}", "hub": f"hub {w.get('tag')}",
            "random-init": f"RANDOM INIT seed {w.get('seed')}"}[w["source"]]


def describe_store(store: str) -> list[str]:
    """Teachers, target table, mask, views, samples, bytes per view, skipped inputs."""
    m = read_manifest(store)
    layout = m.layout
    lines = [f"store      {store}  (format v{m.format_version}, {'complete' if m.complete else 'INCOMPLETE'}, "
             f"{','.join(m.formats)})",
             f"data       {m.config['data']}  images={layout.num_images} views={layout.views} "
             f"seed={layout.order_seed} size={layout.image_size} order=seeded permutation"]
    for t in m.teachers:
        lines.append(f"teacher    {t.role:5s} {t.model}  patch {t.patch_size} grid {t.grid.side}x{t.grid.side} "
                     f"width {t.width} depth {t.depth} heads {t.heads}"
                     + (f" decoder width {t.decoder_width} depth {t.decoder_depth}" if t.decoder_depth else "")
                     + f"  [{_weights(t.weights)}]")
    for t in m.targets:
        lines.append(f"target     {t.name:18s} {t.tap:14s} {ENCODINGS[t.encoding].dtype}{list(t.shape)} {t.encoding}")
    lines.append(f"mask       {m.mask.describe()}")
    lines.append(f"tokens     {m.tokens}: {layout.stored_patches} of {layout.num_patches} patches per view (+CLS)")
    if layout.teacher_visible:
        lines.append(f"visible    the dec targets' teacher saw {layout.teacher_visible} of {layout.num_patches} patches "
                     f"per view (--teacher-mask-ratio {m.config['teacher_mask_ratio']:g})")
    pixels = m.pixels
    lines.append(f"pixels     {pixels.encoding}" + (f" quality {pixels.quality}, decoded by "
                                                      f"{describe_decoder(pixels.decoder)}" if pixels.quality else "")
                 + (f"; targets compressed with {m.compress}" if m.compress != "none" else ""))
    if m.complete:
        nbytes = store_bytes(store)
        lines.append(f"samples    {m.samples} in {len(m.shards)} shards, {human(nbytes)} in all files, "
                     f"{human(nbytes / max(m.samples, 1))} per view")
        lines += entry_lines(store, m)
        lines.append(f"skipped    {len(m.skipped)} inputs")
        lines += [f"           {s['source']} (view {s['view']}): {s['reason']}" for s in m.skipped[:20]]
    return lines


def entry_lines(store: str, m: Manifest) -> list[str]:
    """Bytes per view by webdataset entry, measured on the largest tar shard, and what they come to for the store."""
    per_view = store_view_bytes(store, m)
    if per_view is None:
        return []
    return [f"entries    {line}" if i == 0 else f"           {line}"
            for i, line in enumerate(size_lines(per_view, m.layout.num_images, m.layout.views))]
