"""One process of tests/test_faults.py::test_every_process_of_a_run_stops_when_the_workdir_is_busy.

    python tests/lock_multiprocess_worker.py PORT PROCESS_ID WORKDIR
"""

import sys

import jax

port, pid, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from mdjax.errors import WorkdirBusyError  # noqa: E402
from mdjax.pipeline import workdir as workdir_lib  # noqa: E402

try:
  with workdir_lib.locked(workdir):
    print("entered", flush=True)
except WorkdirBusyError as e:
  print(f"busy: {e}", flush=True)
jax.distributed.shutdown()
