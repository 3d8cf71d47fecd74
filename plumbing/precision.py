"""
plumbing/precision.py -- where a run computes, and in what: --device and --dtype -> a Precision.

    precision = choose_precision("auto", "auto")   # CUDA if there is one; autocast by its features
    with precision.autocast(): ...                  # train.py's forwards (float32 weights)

train.py, experiment.py, one_update.py and bench.py choose with it; update.Learner keeps its
autocast.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from plumbing.load import pick_device


@dataclass
class Precision:
    """Where the run computes, and in what: float32 weights (Adam's small updates vanish in bfloat16)
    under autocast to amp_dtype, or plain float32 (amp_dtype None)."""

    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self):
        """A fresh autocast context (a no-op in float32). train.py, experiment.py and update.py use it."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    @property
    def name(self) -> str:
        """"float32" or e.g. "bfloat16 autocast": what summary.json records."""
        return f"{str(self.amp_dtype)[6:]} autocast" if self.amp_dtype else "float32"

    def describe(self) -> str:
        """The line train.py prints at start."""
        scaler = ", gradient scaler" if self.amp_dtype == torch.float16 else ""
        return f"device {self.device}, precision: {self.name}{scaler}"


def choose_precision(device: str, dtype: str) -> Precision:
    """--device (see load.pick_device) and --dtype -> Precision; its autocast dtype is what this
    processor is fast at, unless --dtype names one (float32: none).

    GPUs, by compute capability: 8.0 and up (A100, H100, RTX 30xx/40xx) compute in bfloat16.
    7.x (V100, T4: free Colab and many classrooms) has float16 tensor cores but no bfloat16, so
    float16 autocast with a gradient scaler (see update.Learner): float16 keeps 3 more digits than bfloat16
    but overflows past 65504, which the forward avoids where it matters (norms, softmax and the
    loss run in float32) and the scaler handles for gradients. Below 7.0 (P100, K80) float32:
    without tensor cores float16 buys no speed, only the overflow risk.
    CPUs differ wildly, and the processor's features decide, never a timing (a timing taken under
    load picks otherwise than one taken idle, and the same command then gives other numbers): with
    native bfloat16 matmuls (AVX512-BF16 or AMX) bfloat16 autocast was about 2x faster than float32
    on an AMX Xeon; without them (an AVX2-only CPU) about 7x *slower*, so float32 there.
    (float16 on a CPU is there to be asked for, --dtype float16, not picked: few CPUs are fast at it.)
    """
    device = pick_device(device)
    if dtype != "auto":
        return Precision(device, None if dtype == "float32" else getattr(torch, dtype))
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        return Precision(device, torch.bfloat16 if major >= 8 else torch.float16 if major >= 7 else None)
    return Precision(device, torch.bfloat16 if cpu_multiplies_bfloat16() else None)


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has native bfloat16 matmul instructions, AVX512-BF16 or AMX (torch's own
    checks; a torch without them: False, float32)."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)
