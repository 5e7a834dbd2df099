"""spread_dials: SPREAD simulation, refinement and model correction as DIALS programs."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Inside a virtual environment libtbx looks for its build dir under the venv's prefix; point
# it at the base interpreter's (Debian: /usr/lib/cctbx/python3.X) before dxtbx is imported.
if not _os.environ.get("LIBTBX_BUILD"):
    _rel = _os.path.join("lib", "cctbx", "python%d.%d" % _sys.version_info[:2])
    if not _os.path.isfile(_os.path.join(_sys.prefix, _rel, "libtbx_env")):
        _cand = _os.path.join(_sys.base_prefix, _rel)
        if _os.path.isfile(_os.path.join(_cand, "libtbx_env")):
            _os.environ["LIBTBX_BUILD"] = _cand

# torch first, so that its bundled OpenMP runtime (torch/lib/libgomp.so.1) is the one loaded:
# dxtbx imports scikit-learn and cctbx's omptbx, which load the system's libgomp.so.1 (Debian 12,
# GCC 12), and torch then runs its parallel CPU kernels on that one.  In that order
# dials.spread_refine model.anomalous=spline_kk aborted in the curvature with "double free or
# corruption" on the 4-still test data, every time; with OMP_NUM_THREADS=1, with torch's
# libgomp preloaded, or with this import order it ran.
import torch as _torch  # noqa: F401
