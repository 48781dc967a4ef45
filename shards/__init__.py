"""The target store: its format (docs/FORMAT.md), atomic writing, and readers.

  format    names, sample encoding, the manifest, version checks
  atomic    write-to-temporary, fsync, rename
  wds       deterministic webdataset tar shards
  zarr      the same arrays stacked along a sample axis
"""
