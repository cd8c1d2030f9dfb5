"""One process of tests/test_gan_ensemble.py::test_two_processes_train_like_one_process.

    python tests/gan_multiprocess_worker.py PORT PROCESS_ID OUT_DIR
"""

import os
import pickle
import sys

import jax

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_gan_ensemble as case  # noqa: E402  (the stand-in GAN and the test's inputs)

result = case.train_multiprocess_case(os.path.join(out, "run"))
with open(os.path.join(out, f"result_{pid}.pkl"), "wb") as fh:
  pickle.dump(case.comparable(result), fh)
jax.distributed.shutdown()
