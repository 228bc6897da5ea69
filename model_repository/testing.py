"""Test helpers shared by tests/test_repository*.py and tests/test_ensemble*.py: one tiny export
per test session (or the one named by TRITON_HYBRID_TEST_EXPORT), built once and reused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tiny_export_dir(tmp_path_factory) -> Path:
    given = os.environ.get("TRITON_HYBRID_TEST_EXPORT")
    if given:
        return Path(given)
    out = tmp_path_factory.getbasetemp() / "tiny_export"
    try:
        return resolve_export(out)
    except (RuntimeError, FileNotFoundError):
        pass
    done = subprocess.run([sys.executable, "-m", "export.cli", "export", "--profile", "tiny", "--out", str(out), "--no-progress"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the tiny export failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return resolve_export(out)


def resolve_export(out: Path) -> Path:
    """The export dir itself, or its latest numbered export when `out` is an exports root."""
    if (out / "metadata.json").exists() or (out / "query_intent.onnx").exists():
        return out
    numbered = sorted((p for p in out.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if numbered and (numbered[-1] / "metadata.json").exists():
        return numbered[-1]
    raise RuntimeError(f"no export in {out}")
