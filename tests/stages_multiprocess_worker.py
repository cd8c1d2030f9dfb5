"""One process of tests/test_pipeline.py::test_two_processes_agree_on_which_stages_are_done.

    python tests/stages_multiprocess_worker.py PORT PROCESS_ID WORKDIR
"""

import os
import sys
import time

import jax

port, pid, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
os.environ["MDJAX_SYNC_TIMEOUT_S"] = "30"  # a process left alone at a barrier fails fast

from mdjax.core import process  # noqa: E402
from mdjax.pipeline.workdir import Stages  # noqa: E402

stages = Stages(workdir)
if pid == 0:
  os.makedirs(stages.dir, exist_ok=True)
process.barrier("made")
# A stage that takes no time: process 0 finds it undone, runs it and writes its record while
# process 1 is still on its way (the sleep); process 1 must still run it, barrier included.
if pid == 1:
  time.sleep(1.5)
outcome = []
for name in ("quick", "quick"):  # the second time it is done for both
  if stages.done(name):
    outcome.append("done")
  else:
    stages.complete(name, {"by": pid})
    outcome.append("ran")
print(" ".join(outcome), flush=True)
jax.distributed.shutdown()
