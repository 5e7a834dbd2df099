"""Run by ``libtbx.configure`` / ``libtbx.refresh`` when spread_dials sits in a cctbx modules/ tree.

It installs the module into the build's Python as an editable package (no dependencies, no build
isolation: DIALS, dxtbx and cctbx come from the tree, torch is installed separately), which
registers the package's console scripts and entry points, as dxtbx's own libtbx_refresh.py does.
libtbx runs this file with ``exec`` while it configures, so ``__file__`` is not ours: the
module's path comes from ``libtbx.env`` (set to the environment being configured).
"""

import subprocess
import sys

import libtbx

_root = libtbx.env.dist_path("spread_dials")
print(f"spread_dials: pip install --no-deps --no-build-isolation -e {_root}")
subprocess.run(
    [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", _root],
    check=True,
)
