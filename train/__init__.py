"""Student side of hdistill: store -> loader -> student -> loss -> step. Never imports a teacher.

  config    what a run trains (TrainConfig), how a process runs it, online sources: the command's options
  data      the epoch plan (lanes, shuffle buffer), what a stream reads (StreamSpec) and the stream of a rank's pieces
            of each global batch
  loader    the opened store (Store: the one way a store is opened) and its loader (hdistill.open_store): batches
            on the device, exact resume
  student   the timm ViT student on kept patches, its taps
  loss      the objective, one term per stored target (paper Eq. 1 and 3)
  source    where targets come from: the store (StoredTargets) or a typed plug-in (hdistill.online)
  validate  the held-out loss
  dist      torchrun / DDP plumbing
  member    one student and what its steps change: loss, optimiser, scaler, schedule, health, its RNG
  loop      the one training loop: N members on one loader's batches, the step rules (log, validate, checkpoint, stop)
  checkpoint  the run folder: its names, lock, stale temporaries, the checkpoint's assembly, commit and resume checks,
            the history, a sweep's record
  log       metrics.jsonl, TensorBoard, the progress bar and lines
  run       a run's plan (store, length, lanes) and its members built: `hdistill train` is a loop of one member
  sweep     K students from one pass over the store (hdistill train --sweep): a loop of K members
  report    a sweep's table and held-out curves
"""
