"""The runtime every stage shares, below every other package: meshes and shardings, process-0 and
barrier helpers, checkpoints, atomic writes, loop cadence, and the CPU convolution rules."""
