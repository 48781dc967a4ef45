"""The target store: its format (docs/FORMAT.md) and the only code that reads or writes it.

  format     names, the sample's arrays, the shard layout and store order
  manifest   the typed manifest (to_dict / from_dict), version check
  encoding   fp16 / int8 / bf16 encodings of targets, and decoding
  wds        deterministic webdataset tar shards
  zarr_store the same arrays stacked along a slot axis
  writer     create / reopen, rank locks, shard commits, finalize
  reader     the samples of a shard from either form, checked and decoded
  verify     checksums and arrays of every shard in every stored form
"""
