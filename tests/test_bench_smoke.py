"""A tiny run of the benchmark harness (bench/): the control-plane section end to end with replay
servers (no export needed), a section whose prerequisite is missing, and the --only merge."""
from __future__ import annotations

from bench import run as bench_run
from bench.common import Ctx, Section


def test_control_section_writes_markdown_with_the_machine(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert bench_run.main(["--only", "control", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## The machine" in text and "| CPU |" in text and "| git commit |" in text
    assert "<!-- section:control -->" in text and "--only control" in text
    # one row per instance count, every replay instance seen healthy
    for n in (1, 10, 100):
        assert f"| {n} | 3 |" in text
    assert "100/100" in text


def test_missing_prerequisite_is_reported_not_invented(tmp_path):
    ctx = Ctx(export_dir=None, work_dir=tmp_path, quick=True, say=lambda m: None)
    sec = bench_run.run_section("routing", ctx)
    assert sec.status == "missing"
    assert "no export" in sec.markdown()


def test_only_replaces_its_own_block(tmp_path):
    old = bench_run.merge("", "# H1\n", {"routing": Section("routing", "R", body=["old routing"]).markdown(),
                                         "control": Section("control", "C", body=["old control"]).markdown()})
    new = bench_run.merge(old, "# H2\n", {"control": Section("control", "C", body=["new control"]).markdown()})
    assert new.startswith("# H2") and "old routing" in new and "new control" in new and "old control" not in new
    assert new.index("section:routing") < new.index("section:control")
