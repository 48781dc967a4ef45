"""The target store: its format (docs/FORMAT.md) and the only code that reads or writes it.

  format     names, the sample's arrays, the shard layout and store order
  manifest   the typed manifest (to_dict / from_dict, the target rows), version check
  encoding   one class per encoding of targets (fp16 / int8 / bf16): dtype, companions, formats, decoding
  tarindex   one pass over a tar shard's headers: each sample's members as offsets
  wds        deterministic webdataset tar shards
  zarr_store the same arrays stacked along a slot axis
  writer     create / reopen, rank locks, shard commits, finalize
  reader     the samples of a shard from either form, checked by crc32c, as views into the loaded shard
  verify     checksums and arrays of every shard in every stored form
"""
