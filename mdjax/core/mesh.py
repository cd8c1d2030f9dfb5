"""Device meshes and shardings: the "data" axis of the classifier, the "class" axis of the GANs.

Every mesh mdjax builds is 1-D and has Auto axis types. Explicit axes (what `jax.make_mesh` gives
by default) make sharding part of every array's type; flax.linen layers are not written for that
(Dropout's `select` of an unsharded mask with a batch-sharded input is a ShardingTypeError), and
the GAN host loop slices single classes out of the stacked state, which Explicit sharding refuses.
Steps compile against the Auto form of whatever mesh they are given (`auto_mesh`), so arrays a
caller placed on an Explicit mesh are still accepted as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"  # the classifier's batch is split over it (data parallelism)
CLASS_AXIS = "class"  # the weak classes' GANs are split over it (no communication at all)


def _line_mesh(axis: str, devices: Sequence[jax.Device] | None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices (or `devices`) with the data-parallel axis "data"."""
  return _line_mesh(DATA_AXIS, devices)


def class_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices (or `devices`) with the axis the GANs' class dimension is on."""
  return _line_mesh(CLASS_AXIS, devices)


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axis types (see the module docstring)."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (the classifier's state)."""
  return NamedSharding(auto_mesh(mesh), P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dimension split over "data"."""
  return NamedSharding(auto_mesh(mesh), P(DATA_AXIS))


def class_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (class) dimension split over "class"."""
  return NamedSharding(auto_mesh(mesh), P(CLASS_AXIS))
