"""spread_dials.util.device: auto|cpu|cuda and float32|float64 (no cctbx needed: also runs on GPU machines)."""

from __future__ import annotations

import pytest
import torch

from spread_dials.util.device import select_device, select_dtype
from spread_dials.util.errors import Sorry, SpreadError


def test_cpu_and_auto():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cpu", rank=3) == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent():
    with pytest.raises(SpreadError, match="device.name=cuda was requested but") as info:
        select_device("cuda")
    assert isinstance(info.value, Sorry)
    assert "device.name=cpu" in str(info.value)  # says what to do instead


def test_unknown_names():
    with pytest.raises(SpreadError, match="device.name must be one of auto, cpu, cuda"):
        select_device("tpu")
    with pytest.raises(SpreadError, match="device.dtype must be one of float32, float64"):
        select_dtype("float16")


def test_dtype():
    assert select_dtype("float32") is torch.float32
    assert select_dtype("float64") is torch.float64
    assert torch.zeros(1, dtype=select_dtype("float64")).element_size() == 8


@pytest.mark.gpu
def test_cuda_rank_round_robin():
    n = torch.cuda.device_count()
    assert select_device("cuda", rank=0) == torch.device("cuda", 0)
    assert select_device("auto", rank=n + 1) == torch.device("cuda", 1 % n)
    x = torch.ones(2, device=select_device("cuda"), dtype=select_dtype("float32"))
    assert x.is_cuda
