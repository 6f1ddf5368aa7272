"""Where the work runs: the device, the numeric precision, and the processes of a torchrun launch.

- ``select_device("auto")``: a CUDA GPU, else Apple's MPS, else the CPU;
- ``precision(device)``: bf16 autocast on GPUs that support it, fp16 autocast with a GradScaler on other GPUs, plain
  float32 on CPU and MPS;
- ``maybe_compile(model, device)``: torch.compile when the compiler it needs is installed, else eager with a message;
- ``init_processes()``: under ``torchrun --nproc_per_node=N`` each process joins the group (gloo on CPU, nccl on GPUs)
  and learns its rank; alone, it is rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():  # does not initialise CUDA when there is none
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def precision(device: torch.device, dtype: str = "auto"):
    """(autocast context, GradScaler or None): bf16 autocast on GPUs that support it, fp16 + GradScaler on the
    others, plain float32 on CPU and MPS."""
    if dtype == "auto":
        if device.type != "cuda":
            dtype = "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext(), None
    ctx = torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None
    return ctx, scaler


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device, or None if it can: inductor writes C++ for the CPU (a C++
    compiler must be installed) and Triton kernels for CUDA GPUs (the triton package must be installed)."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:  # noqa: BLE001 - any failure to find one means the same thing here
            return "torch.compile needs a C++ compiler on the CPU (g++ or clang++, or set CXX) and found none"
    elif device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs the triton package on CUDA GPUs and it is not installed"
    return None


def maybe_compile(model, device: torch.device, enabled: bool = True):
    """torch.compile(model) when enabled and possible; otherwise the model itself, after a one-line message saying
    why (eager mode computes the same thing, only more slowly)."""
    if not enabled:
        return model
    missing = compiler_missing(device)
    if missing:
        print(f"{missing}: running in eager mode instead", flush=True)
        return model
    return torch.compile(model)


@dataclass
class Processes:
    """Where this process sits among the torchrun processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_processes() -> Processes:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return Processes(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world)


