"""The runtime every stage shares, below every other package (it imports none of them).

  mesh        the "data" and "class" meshes and their shardings
  process     process 0 writes, barriers, reading sharded / replicated arrays on the host
  collectives a cross-device mean added in device order: the same bits for any process layout
  checkpoint  one orbax CheckpointManager wrapper for every stage
  files       atomic writes (temp file, fsync, rename)
  storage     a full disk or a permission problem, in any thread, as one StorageError
  loop        cadence (`itstime`) and finite checks
  cpu_conv    XLA CPU compiler options (`cpu_conv.jit`) and convolution gradient rules (classifier, GANs)
"""
