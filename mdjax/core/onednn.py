"""oneDNN's convolutions inside XLA CPU programs, through XLA's FFI (`onednn_conv.cc`).

XLA's CPU backend runs convolutions on Eigen or YNNPACK. oneDNN (the library behind PyTorch's CPU
convolutions) runs WRN-16-4's NHWC float32 3x3 convolutions in 1.27 s per gradient against Eigen's
1.71 s on an AVX-512 machine (benchmarks/conv_layers.py), so mdjax's CPU classifier step hands
its convolutions to oneDNN (`mdjax.core.cpu_conv`, "oneDNN rules"). GPUs never use this module.

The custom calls live in a small C++ library compiled on first use, the way
torch.utils.cpp_extension.load does, because the two things it links against come from two wheels
installed separately: jaxlib (XLA's FFI headers, `jax.ffi.include_dir()`) and oneDNN
(`onednn-devel-cpu-gomp`, which `pip install -e ".[onednn]"` adds on Linux x86-64: an opt-in, as
only convolutions of at least 0.3 GFLOP a pass gain from it). The build takes about 5 s with
g++ and is cached under `$MDJAX_CACHE_DIR` (default `~/.cache/mdjax`), keyed by the source, the
jaxlib version and the oneDNN found; concurrent processes build it once (a file lock) and never load
a half-written library (it is written under a temporary name and renamed).

Without the extra (no oneDNN found) `available()` is False and nothing is said: XLA's
convolutions are the default. Where the extra is installed but cannot work (no C++ compiler,
another CPU architecture) it is False and mdjax logs why once; `MDJAX_ONEDNN=0` turns it off. The
CPU programs then keep XLA's convolutions: same results, slower steps. The library is built the
first time a step has a convolution that qualifies (mdjax.core.cpu_conv), not before.
`python -m mdjax.core.onednn` builds it and says what it found.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from mdjax.core.collectives import varying_axes

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_LIBRARY = "libmdjax_onednn.so"
# XLA FFI target name -> the handler symbol that onednn_conv.cc exports.
TARGETS = {
    "mdjax_onednn_conv": "MdjaxOnednnConv",
    "mdjax_onednn_conv_dx": "MdjaxOnednnConvDx",
    "mdjax_onednn_conv_dw": "MdjaxOnednnConvDw",
}
_CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
  """The FFI library could not be built or loaded; the message says what is missing."""


class NotInstalled(BuildError):
  """No oneDNN to build against: the `onednn` extra is not installed."""


# System-wide prefixes searched after $DNNLROOT and the Python environment.
_SYSTEM_PREFIXES = ("/usr/local", "/usr")


def _onednn_root() -> tuple[Path, Path]:
  """(include directory, library directory) of the first prefix with both
  include/oneapi/dnnl/dnnl.hpp and a lib*/libdnnl.so."""
  candidates = [os.environ.get("DNNLROOT"), sys.prefix, sys.base_prefix, *_SYSTEM_PREFIXES]
  for root in map(Path, filter(None, candidates)):
    if not (root / "include/oneapi/dnnl/dnnl.hpp").is_file():
      continue
    for lib in ("lib", "lib64", "lib/x86_64-linux-gnu"):
      if (root / lib / "libdnnl.so").exists():
        return root / "include", root / lib
  raise NotInstalled(
      "oneDNN not found: no include/oneapi/dnnl/dnnl.hpp with lib/libdnnl.so under "
      f"{[c for c in candidates if c]}. Install mdjax's extra with `pip install -e \".[onednn]\"` "
      "(Linux x86-64), or point DNNLROOT at a oneDNN 3.x install.")


def installed() -> bool:
  """Whether oneDNN (the `onednn` extra) and a C++ compiler are here to build the library with."""
  try:
    _onednn_root()
    _compiler()
  except BuildError:
    return False
  return True


def _cache_dir() -> Path:
  return Path(os.environ.get("MDJAX_CACHE_DIR") or Path.home() / ".cache" / "mdjax") / "onednn"


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise BuildError("no C++ compiler found (looked for $CXX, g++, c++). Install one (Debian: "
                     "`apt-get install g++`) or set CXX.")
  return cxx


def _build_command(cxx: str, include: Path, libdir: Path, output: Path) -> list[str]:
  return [cxx, *_CXXFLAGS, f"-I{jax.ffi.include_dir()}", f"-I{include}", str(_SOURCE),
          "-o", str(output), f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"]


def build() -> Path:
  """The compiled FFI library, built now if the cache lacks it. Raises BuildError."""
  if sys.platform != "linux":
    raise BuildError(f"mdjax's oneDNN convolutions are built for Linux only, not {sys.platform}")
  (include, libdir), cxx = _onednn_root(), _compiler()
  version = (include / "oneapi/dnnl/dnnl_version.h").read_bytes()
  key = hashlib.sha256(b"\0".join([
      _SOURCE.read_bytes(), jax.__version__.encode(), version, str(libdir).encode(), cxx.encode(),
      " ".join(_CXXFLAGS).encode()])).hexdigest()[:16]
  target = _cache_dir() / key / _LIBRARY
  if target.is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / "build.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait, then find it
    if target.is_file():
      return target
    _log.info("Compiling mdjax's oneDNN convolutions (once, into %s)", target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      partial = Path(tmp) / _LIBRARY
      result = subprocess.run(_build_command(cxx, include, libdir, partial), capture_output=True,
                              text=True)
      if result.returncode != 0:
        raise BuildError(f"compiling {_SOURCE.name} failed ({cxx}, exit {result.returncode}):\n"
                         f"{result.stderr.strip()[-4000:]}")
      os.replace(partial, target)  # complete or absent, never half-written
  return target


@functools.cache
def available() -> bool:
  """Whether oneDNN's convolutions are built, loaded and registered with XLA (once per process).

  False where they cannot be: silently without the `onednn` extra, else with one warning saying
  why (module docstring)."""
  if os.environ.get("MDJAX_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
    _log.info("MDJAX_ONEDNN=%s: CPU convolutions stay XLA's.", os.environ["MDJAX_ONEDNN"])
    return False
  try:
    library = ctypes.CDLL(str(build()))
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except NotInstalled as e:
    _log.debug("%s", e)
    return False
  except (BuildError, OSError, AttributeError) as e:
    _log.warning("oneDNN convolutions unavailable, CPU convolutions stay XLA's (same results, "
                 "slower): %s", e)
    return False
  return True


def _attributes(strides, padding) -> dict:
  (pt, pb), (pl, pr) = padding
  return {"strides": np.asarray(strides, np.int64),
          "padding": np.asarray([pt, pb, pl, pr], np.int64)}


def _call(target: str, out_shape, *args, strides, padding):
  if not available():
    raise BuildError("oneDNN's convolutions are unavailable here (the warning above says why); "
                     "check `onednn.available()` before calling them.")
  # "sequential": under jax.vmap each example of the mapped axis is one call (the handlers take
  # plain 4-D arrays); mdjax's own vmapped convolutions never get here (cpu_conv).
  out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, args[0].dtype),
                         vmap_method="sequential")(*args, **_attributes(strides, padding))
  # Inside shard_map a custom call's result is typed as the same on every device; it varies as
  # its operands do, and custom_vjp checks that a gradient is typed like its primal.
  axes = frozenset().union(*map(varying_axes, args))
  return jax.lax.pcast(out, tuple(sorted(axes)), to="varying") if axes else out


def output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
  (pt, pb), (pl, pr) = padding
  kh, kw, _, o = w_shape
  return (x_shape[0], (x_shape[1] + pt + pb - kh) // strides[0] + 1,
          (x_shape[2] + pl + pr - kw) // strides[1] + 1, o)


def conv(x, w, strides, padding):
  """y = conv(x, w): x float32 NHWC, w HWIO, explicit `padding` ((top, bottom), (left, right))."""
  return _call("mdjax_onednn_conv", output_shape(x.shape, w.shape, strides, padding), x, w,
               strides=strides, padding=padding)


def conv_input_grad(dy, w, x_shape, strides, padding):
  """dL/dx of `conv` for the output gradient `dy`."""
  return _call("mdjax_onednn_conv_dx", tuple(x_shape), dy, w, strides=strides, padding=padding)


def conv_weight_grad(x, dy, w_shape, strides, padding):
  """dL/dw of `conv` for the output gradient `dy`."""
  return _call("mdjax_onednn_conv_dw", tuple(w_shape), x, dy, strides=strides, padding=padding)


def main() -> None:
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    path = build()
  except BuildError as e:
    sys.exit(f"mdjax: {e}")
  include, libdir = _onednn_root()
  print(f"oneDNN: {include}, {libdir}\nlibrary: {path}\nregistered: {available()}")


if __name__ == "__main__":
  main()
