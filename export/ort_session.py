"""The one way this project opens an ONNX graph in onnxruntime outside Triton (the export's parity
checks, its benchmark, the in-process reference pipeline): CPU, one intra-op thread unless
TRITON_HYBRID_ORT_THREADS says otherwise. Kept free of torch so the reference pipeline and the
benchmarks load it cheaply."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def session(path: Path | str, threads: int | None = None) -> ort.InferenceSession:
    # One thread: these graphs are small, and on a shared CPU a second intra-op thread measured
    # slower (its pool spins while the other thread works) and made the in-process figures bimodal.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or int(os.environ.get("TRITON_HYBRID_ORT_THREADS", "1"))
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
