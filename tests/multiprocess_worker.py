"""One process of tests/test_pipeline.py::test_two_processes_build_one_global_batch."""

import sys

import jax

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

from mdjax.core import mesh as mesh_lib
from mdjax.data import pipeline  # noqa: E402
from mdjax.data.sources import ArraySource  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4
images = np.random.default_rng(0).integers(0, 256, size=(50, 12, 12, 3), dtype=np.uint8)
images[:, 0, 0, 0] = np.arange(50)
src = ArraySource(images, np.arange(50) % 5)
mesh = mesh_lib.data_mesh()
it = pipeline.train_batches(src, batch_size=8, image_size=12, seed=5, mesh=mesh, augment="none")
local_ids = []
for _ in range(3):
  batch = next(it)
  assert batch["image"].shape == (8, 12, 12, 3)  # one global array across both processes
  local = np.concatenate([np.asarray(s.data) for s in batch["image"].addressable_shards])
  local_ids.append(np.round(local[:, 0, 0, 0] * 255).astype(int))
np.save(f"{out}/ids_{pid}.npy", np.stack(local_ids))
seen = []
for batch in pipeline.eval_batches(src, batch_size=8, image_size=12, mesh=mesh):
  image = np.concatenate([np.asarray(s.data) for s in batch["image"].addressable_shards])
  mask = np.concatenate([np.asarray(s.data) for s in batch["mask"].addressable_shards])
  seen.extend(np.round(image[:, 0, 0, 0] * 255).astype(int)[mask > 0].tolist())
np.save(f"{out}/eval_{pid}.npy", np.asarray(seen))
jax.distributed.shutdown()
