"""Shared types and plumbing of hdistill: the target kinds and specs, mask and teacher descriptions, view
records, token bookkeeping and timm taps, storage locations, atomic writes, locks, worker processes, errors.

`common` depends on nothing else in hdistill; `shards`, `precompute` and `train` build on it.
"""
