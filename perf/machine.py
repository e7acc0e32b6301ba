"""What the perf commands run on: the interpreter switch, the device, the versions.

Imports neither torch nor triton: Triton reads ``TRITON_INTERPRET`` when it is first imported, so a
command decides (``start_device``) before anything imports triton or triton_instnorm.
"""

from __future__ import annotations

import os
import sys
import time

from perf.schema import ENV_COLUMNS

INTERPRETER_DEVICE = "CPU (Triton interpreter)"  # the device column of runs without a GPU


def interpreting() -> bool:
    """Triton runs (or, imported now, would run) kernels through its interpreter: TRITON_INTERPRET
    as Triton reads it (``triton.knobs.runtime.interpret``: 1, true, yes, on or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def start_device(command: str):
    """(device, its name, whether the kernels run through Triton's interpreter).

    Without a GPU, sets TRITON_INTERPRET=1: call this before anything imports triton or
    triton_instnorm. ``command`` is what to run instead when that is too late."""
    import torch  # does not import triton

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name(), False
    if "triton" in sys.modules and not interpreting():
        raise SystemExit("without a GPU the kernels run through Triton's interpreter, which "
                         f"must be on before triton is imported; run a fresh process: {command}")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu"), INTERPRETER_DEVICE, True


def environment(device_name: str) -> dict:
    """The columns every CSV row starts with (``ENV_COLUMNS``): device, versions, date."""
    import torch
    import triton
    return dict(zip(ENV_COLUMNS, (device_name, torch.__version__, triton.__version__,
                                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))))
