"""One process of tests/test_core.py::test_two_processes_meet_without_device_collectives.

    python tests/process_multiprocess_worker.py PORT PROCESS_ID OUT_DIR
"""

import os
import sys
import time

import jax

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mdjax.core import mesh as mesh_lib, process  # noqa: E402

mesh = mesh_lib.data_mesh()
host = np.arange(24, dtype=np.float64).reshape(4, 6)  # float64: placed as float32, as device_put does

# The meeting points and placements must not run a device collective of their own: any
# multihost_utils collective from here on fails the run.
def no_collective(*args, **kwargs):
  raise AssertionError("a device collective ran")


for name in ("process_allgather", "sync_global_devices", "assert_equal", "broadcast_one_to_all"):
  setattr(multihost_utils, name, no_collective)

x = process.put_global({"w": host}, mesh_lib.batch_sharding(mesh))
n = process.put_global(3, mesh_lib.replicated(mesh))
assert n.dtype == np.int32 and int(process.fetch_replicated(n)) == 3
assert x["w"].dtype == np.float32 and not x["w"].is_fully_addressable
local = np.concatenate([np.asarray(s.data) for s in x["w"].addressable_shards])
np.testing.assert_array_equal(local, host[2 * pid:2 * pid + 2])  # its own rows, from its own copy
assert process.any_process(pid == 1) and not process.any_process(False)
assert process.from_writer(7 if pid == 0 else 99) == 7
if pid == 1:
  time.sleep(1.0)
  with open(os.path.join(out, "late"), "w") as fh:
    fh.write("1")
process.barrier("late written")
assert os.path.exists(os.path.join(out, "late"))  # nobody passed the barrier before process 1
# Gathered through the service too: every process gets the whole arrays, and a process's own
# values (numpy) are concatenated in process order.
got = process.fetch_sharded({"w": x["w"], "w2": x["w"] * 2, "n": n, "own": np.full(2, pid)})
np.testing.assert_array_equal(got["w"], host.astype(np.float32))
np.testing.assert_array_equal(got["w2"], 2 * host.astype(np.float32))
assert int(got["n"]) == 3
np.testing.assert_array_equal(got["own"], [0, 0, 1, 1])
for _ in range(3):  # later gathers delete the earlier ones' keys and still agree
  np.testing.assert_array_equal(process.fetch_sharded(x["w"]), host.astype(np.float32))
# A barrier process 1 never reaches fails process 0 with its name instead of waiting forever.
if pid == 0:
  os.environ["MDJAX_SYNC_TIMEOUT_S"] = "2"
  try:
    process.barrier("only process 0 comes here")
  except process.PeerTimeoutError as e:
    print(f"timeout: {e}", flush=True)
print("ok", flush=True)
jax.distributed.shutdown()
