"""INT8 dynamic quantization with onnxruntime.quantization, the accuracy guard, and the speedup."""
from __future__ import annotations

import logging
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights INT8 (per tensor), activations quantized dynamically at run time."""
    logging.getLogger("root").setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def int8_guard(fp32_metric: float, int8_metric: float, max_drop: float) -> tuple[bool, str]:
    """Keep the INT8 model only if its metric is at most `max_drop` below FP32 (0.005 = 0.5 point)."""
    drop = fp32_metric - int8_metric
    if drop <= max_drop + 1e-12:
        return True, f"kept: drop {drop * 100:.2f} points <= {max_drop * 100:.2f}"
    return False, f"rejected: drop {drop * 100:.2f} points > {max_drop * 100:.2f}"


def student_guard(teacher_acc: float, student_acc: float, speedup: float, max_drop: float,
                  min_speedup: float) -> tuple[bool, str]:
    """Keep the distilled student only if accuracy drops at most `max_drop` and it is `min_speedup`x faster."""
    drop = teacher_acc - student_acc
    problems = []
    if drop > max_drop + 1e-12:
        problems.append(f"accuracy drop {drop * 100:.2f} points > {max_drop * 100:.2f}")
    if speedup < min_speedup:
        problems.append(f"speedup {speedup:.2f}x < {min_speedup:.1f}x")
    if problems:
        return False, "rejected: " + "; ".join(problems)
    return True, f"kept: drop {drop * 100:.2f} points, speedup {speedup:.2f}x"
