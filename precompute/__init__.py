"""Teacher side of hdistill: images -> views -> teachers -> targets -> store.

Modules, in the order of the flow:
  image     decode any image file into RGB uint8
  view      deterministic RandomResizedCrop + flip from (seed, image id, view index)
  teachers  the role registry and the timm / open_clip teacher wrappers
  mask      the progressive redundant-token mask (paper Eq. 4)
  targets   one forward per teacher -> the target table's values, and the mask
  data      image sources (folders, lists, tars, object storage) and the views dataset
  config    what a store holds (PrecomputeConfig) and how a process runs (Runtime): the command's options
  run       the precompute run: batches of views through the teachers into store shards
"""
