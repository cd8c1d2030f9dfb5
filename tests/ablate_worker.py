"""Runs `mdjax.ablate` with two methods added to its registry for tests/test_ablate.py.

    python tests/ablate_worker.py <mdjax.ablate flags>

  broken     sets mistake.nwpc to 50 classes: valid as a config, but the digits have 10 classes,
             so the cell stops once its data is loaded (a cell that fails at run time)
  needs_key  sets a key no mdjax defines (a method this mdjax cannot run)
"""

from mdjax import ablate

ablate.METHODS["broken"] = ablate.Method("fails at run time: more weak classes than classes",
                                         {"mistake.nwpc": 50})
ablate.METHODS["needs_key"] = ablate.Method("sets a key no mdjax defines",
                                            {"train.no_such_key": True})

if __name__ == "__main__":
  ablate.main()
