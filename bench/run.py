"""`make bench` / `python -m bench.run --out BENCHMARKS.md [--only SECTION ...] [--quick]`.

Runs the sections in order; each measures its figures and their reference in the same run and
returns a markdown block. The file starts with the machine it ran on. With `--only`, only those
sections' blocks are replaced in an existing file (the others are kept as they were, with their
own dates). A section whose prerequisite is missing says so in the file instead of a number.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import PROJECT_ROOT, Ctx, Missing, Section, machine

# (key, module, title) in the order they run
SECTIONS = [
    ("routing", "bench.routing", "1. Routing overhead: HAProxy vs direct Triton"),
    ("serving", "bench.serving", "2. Serving vs its limits: Triton vs in-process vs a Flask service"),
    ("formats", "bench.formats", "3. Model formats: FP32 vs INT8 vs distilled student"),
    ("failover", "bench.failover", "4. Failover: onprem-crash, onprem-hang and query-of-death drills"),
    ("rollout", "bench.rollout", "5. Rollout: publish -> live on every instance, under load"),
    ("control", "bench.control_plane", "6. Control-plane cost: CPU time per poll + decide tick"),
    ("sites", "bench.sites", "7. Site down"),
]
KEYS = [k for k, _, _ in SECTIONS]


def find_export(given: str | None) -> Path | None:
    if given:
        return Path(given).resolve()
    try:
        from model_repository.build import latest_export_dir  # noqa: PLC0415
        return latest_export_dir()
    except Exception:  # noqa: BLE001 - no export: sections that need one say so
        return None


def header(m: dict, ctx: Ctx, keys: list[str]) -> str:
    rows = [("date", m["date"]), ("git commit", m["git_commit"]), ("host", m["host"]),
            ("CPU", f"{m['cpu']} ({m['nproc']} cores visible)"), ("memory", m["memory"]),
            ("GPU", m["gpu"]), ("load average at start", m["load_average"]), ("OS", m["os"]),
            ("Python", m["python"]),
            ("Triton", f"{ctx.facts.get('triton', 'no Triton started in this run')} (tritonserver of nvidia-pytriton {m['nvidia-pytriton']}, CPU, "
                       "Python backend + onnxruntime inside it)"),
            ("onnxruntime / tritonclient", f"{m['onnxruntime']} / {m['tritonclient']}"),
            ("HAProxy", m["haproxy"]),
            ("export", f"{ctx.export_dir} (profile {ctx.facts.get('profile', '?')})" if ctx.export_dir else "none"),
            ("mode", "quick (tiny durations: a smoke run, not figures to quote)" if ctx.quick else "full")]
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`.venv/bin/python -m bench.run --out BENCHMARKS.md`). Every figure is "
             "measured in the same run as its reference, interleaved where it can be, so that a noisy machine "
             "shifts both. Benchmarks print figures; nothing here passes or fails on an absolute time.", "",
             "## The machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Measured by the latest invocation (the table above is its machine record): {', '.join(keys)}. "
              "Every section ends with the date it was measured and the load average then.", "",
              "<!-- /header -->", ""]
    return "\n".join(lines)


def run_section(key: str, ctx: Ctx) -> Section:
    mod_name, title = next((m, t) for k, m, t in SECTIONS if k == key)
    t0 = time.monotonic()
    try:
        mod = importlib.import_module(mod_name)
        sec = mod.run(ctx)
        sec.title = title
    except Missing as e:
        sec = Section(key, title, status="missing", body=[f"Not measured: {e}"])
    except Exception as e:  # noqa: BLE001 - one broken section must not stop the others
        tb = traceback.format_exc(limit=6)
        sec = Section(key, title, status="error",
                      body=[f"The section failed: `{type(e).__name__}: {str(e)[:500]}`", "```\n" + tb[-2500:] + "\n```"])
    sec.seconds = time.monotonic() - t0
    return sec


def merge(existing: str, new_header: str, blocks: dict[str, str]) -> str:
    """Replace the header and the given sections' blocks in an existing BENCHMARKS.md."""
    parts = {}
    for k in KEYS:
        m = re.search(rf"<!-- section:{k} -->.*?<!-- /section:{k} -->\n?", existing, re.S)
        if m:
            parts[k] = m.group(0)
    parts.update(blocks)
    heads = []
    for k in KEYS:
        m = re.search(r"^## (.+?)\n\n\*\*Headline\.\*\* (.+?)$", parts.get(k, ""), re.M)
        if m:
            heads.append(f"- **{m.group(1)}**: {m.group(2)}")
        elif k in parts:
            st = re.search(r"\*\*Status: (\w+)\.\*\*", parts[k])
            t = re.search(r"^## (.+)$", parts[k], re.M)
            if st and t:
                heads.append(f"- **{t.group(1)}**: {st.group(1)} (see the section)")
    summary = ("## Headlines\n\n" + "\n".join(heads) + "\n\n") if heads else ""
    return new_header + summary + "\n".join(parts[k] for k in KEYS if k in parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Side-by-side benchmarks of the stack; writes markdown.")
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write (default BENCHMARKS.md)")
    ap.add_argument("--only", action="append", default=[], metavar="SECTION",
                    help=f"run only these sections (repeat or comma-separate): {', '.join(KEYS)}")
    ap.add_argument("--export", default=None, help="export dir (default: the latest under artifacts/exports)")
    ap.add_argument("--quick", action="store_true", help="tiny durations and repetitions (a smoke run)")
    ap.add_argument("--work-dir", default=None, help="scratch dir (default: a new temp dir, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    a = ap.parse_args(argv)
    keys = [k.strip() for x in a.only for k in x.split(",") if k.strip()] or KEYS
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        ap.error(f"unknown section {unknown[0]!r}; choose from {', '.join(KEYS)}")
    keys = [k for k in KEYS if k in keys]
    if a.export and not (Path(a.export) / "metadata.json").is_file():
        ap.error(f"--export {a.export}: not an export directory (no metadata.json)")
    # Short path: HAProxy refuses unix socket paths over ~97 characters.
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="thb-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(find_export(a.export), work, quick=a.quick, say=lambda m: print(f"[bench] {m}", flush=True))
    if ctx.export_dir is not None:
        try:
            import json  # noqa: PLC0415
            meta = json.loads((ctx.export_dir / "metadata.json").read_text())
            ctx.facts["profile"] = meta.get("profile", {}).get("name") if isinstance(meta.get("profile"), dict) \
                else meta.get("profile", "?")
        except Exception:  # noqa: BLE001
            pass
    m = machine()
    ctx.say(f"export: {ctx.export_dir}; work dir: {work}; sections: {', '.join(keys)}")
    blocks = {}
    try:
        for k in keys:
            ctx.say(f"=== section {k} ===")
            sec = run_section(k, ctx)
            blocks[k] = sec.markdown()
            ctx.say(f"=== section {k}: {sec.status} in {sec.seconds:.0f}s ===")
            print(blocks[k], flush=True)
            # Write after every section: a run cut short keeps what it measured.
            out = Path(a.out)
            if not out.is_absolute():
                out = PROJECT_ROOT / out
            existing = out.read_text() if out.exists() else ""
            out.write_text(merge(existing, header(m, ctx, keys), blocks))
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    ctx.say(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
