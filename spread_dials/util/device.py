"""Device and dtype choice for the torch forward model (the ``device`` PHIL scope).

Example::

    device = select_device(params.device.name, rank=mpi.rank)   # cuda:<rank % n> or cpu
    dtype = select_dtype(params.device.dtype)                    # torch.float32
"""

from __future__ import annotations

import torch

from spread_dials.util.errors import SpreadError

__all__ = ["DEVICE_NAMES", "DTYPE_NAMES", "select_device", "select_dtype"]

DEVICE_NAMES = ("auto", "cpu", "cuda")
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64}


def select_device(name: str = "auto", rank: int | None = None) -> torch.device:
    """Turn ``auto|cpu|cuda`` into a ``torch.device``.

    Arguments:
        name: "auto" (CUDA if torch sees a GPU, else CPU), "cpu" or "cuda".
        rank: this process's MPI rank; with several visible GPUs rank r gets device r % n
            (see :func:`spread_dials.parallel.assign_gpu`).  None: the current CUDA device.

    Raises:
        SpreadError: for an unknown name, or "cuda" when torch has no usable GPU.
    """
    name = (name or "auto").lower()
    if name not in DEVICE_NAMES:
        raise SpreadError(f"device.name must be one of {', '.join(DEVICE_NAMES)}, not {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise SpreadError(
            f"device.name=cuda was requested but {built} (torch {torch.__version__}); "
            "use device.name=cpu or auto, or install a CUDA build of torch (see INSTALL.md)"
        )
    if rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    from spread_dials.parallel import assign_gpu

    return torch.device("cuda", assign_gpu(rank))


def select_dtype(name: str = "float32") -> torch.dtype:
    """Turn ``float32|float64`` into a ``torch.dtype``; anything else is a SpreadError."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise SpreadError(f"device.dtype must be one of {', '.join(DTYPE_NAMES)}, not {name!r}") from None
