"""Shared types of hdistill: target specs, teacher descriptions, view records, errors.

`common` depends on nothing else in hdistill; `shards`, `precompute` and `train` build on it.
"""
