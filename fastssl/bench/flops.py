"""FLOPs counted, not guessed, and the peak FLOP/s that model-FLOPs utilisation (MFU) is measured against.

The count is torch's own FlopCounterMode over one forward and backward of the method (2 FLOPs per
multiply-add of every matmul, convolution and attention it dispatches, the backward's included). The
augmentation and the optimiser are left out on purpose: MFU, as in PaLM (Chowdhery et al. 2022, app. B)
and nanoGPT, compares the model's arithmetic with the hardware's, and elementwise work would only inflate
it. FLOPs do not depend on the data, so they are counted once per configuration, eagerly (a compiled
graph dispatches the same matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets. Matched against
# torch.cuda.get_device_name() in this order, so the more specific names come first: "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA H200", "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA A100-SXM4-80GB".
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),  # the H100 NVL's clocks and power
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # H200 SXM: H100 SXM's SMs
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # H100 SXM5
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def math_dtype(precision: str, allow_tf32: bool = False) -> str:
    """The arithmetic the tensor cores run: the autocast dtype, or fp32 (tf32 when matmuls may use it)."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if allow_tf32 else "fp32"


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype`, or None when the device is not in the table (CPUs included)."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def _cpu_attention_formulas() -> dict:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU's flash attention, which it would count
    as 0 FLOPs (a ViT's attention matmuls, ~8% of ViT-S/16's at 224 px): the same formulas as the CUDA ones."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that torch dispatches while fn() runs (call it with one forward and backward inside)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def achieved_tflops(flops_per_step: int, steps_per_s: float) -> float:
    return flops_per_step * steps_per_s / 1e12


def mfu(flops_per_step: int, steps_per_s: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: achieved FLOP/s over the device's peak; None without a known peak."""
    if peak is None or peak <= 0:
        return None
    return achieved_tflops(flops_per_step, steps_per_s) / peak


def device_peak(device: torch.device, precision: str) -> tuple[str, float | None]:
    """(math dtype, peak TFLOP/s) for the training device; no peak on CPUs (their FLOP/s vary too much
    with the core count and vector width to tabulate honestly)."""
    if device.type != "cuda":
        return math_dtype(precision), None
    # cuDNN runs fp32 convolutions as tf32 by default (cudnn.allow_tf32=True) while matmuls stay fp32: take
    # the tf32 peak when either may, so the MFU of an fp32 run is never overstated.
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    dtype = math_dtype(precision, tf32)
    return dtype, peak_tflops(torch.cuda.get_device_name(device), dtype)
