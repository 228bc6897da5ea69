"""A tiny run of the benchmark harness (bench/): the control-plane section end to end with replay
servers (no export needed), a section whose prerequisite is missing, and the --only merge."""
from __future__ import annotations

from bench import run as bench_run
from bench.common import Ctx, Section, stats_breakdown
from bench.formats import guard
from bench.serving import round_ratios, spread_row, targets


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


def test_stats_breakdown_is_per_request_and_per_step():

    def snap(requests, execs, ns):
        return {"requests": requests, "executions": execs, "inferences": requests,
                **{f"{k}_ns": ns[i] for i, k in enumerate(("success", "queue", "compute_input", "compute_infer",
                                                           "compute_output"))}}
    before = {"a": snap(10, 10, [0] * 5), "b": snap(10, 10, [0] * 5), "search_ranking": snap(10, 10, [0] * 5)}
    after = {"a": snap(110, 60, [100_000_000, 10_000_000, 1_000_000, 80_000_000, 9_000_000]),
             "b": snap(110, 110, [50_000_000, 0, 0, 50_000_000, 0]),
             "search_ranking": snap(110, 110, [160_000_000, 0, 0, 0, 0])}
    rows = stats_breakdown(before, after, ["a", "b"])
    assert rows[0] == ["a", 100, 2.0, 100.0, 10.0, 800.0, 90.0, 1000.0]   # us per request, 2 requests per execution
    assert rows[1][0] == "b" and rows[1][-1] == 500.0
    assert rows[2][0].startswith("search_ranking") and rows[2][-1] == 1600.0
    assert rows[3][-1] == 100.0                                        # whole - sum of steps


def test_the_serving_guard_keeps_only_fast_and_good_variants():
    assert guard(1.6, 0.004)[0] is True
    assert guard(1.4, 0.0)[0] is False and "< 1.5x" in guard(1.4, 0.0)[1]
    assert guard(2.0, 0.017)[0] is False and "1.70 points (> 1)" in guard(2.0, 0.017)[1]
    assert guard(None, 0.0) == (False, "not measured")


def test_the_concurrency_1_ratio_is_reported_per_round():
    """Issue 17: one ratio per round (the two runs of a round measured one after the other), with its
    min / median / max, so a noisy machine shows as a spread instead of hiding in one number."""
    triton = [{"p50_ms": 1.5}, {"p50_ms": 3.0}, {"p50_ms": None}, {"p50_ms": 1.2}]
    bound = [{"p50_ms": 0.5}, {"p50_ms": 0.6}, {"p50_ms": 0.5}, {"p50_ms": 0.6}]
    ratios = round_ratios(triton, bound)
    assert ratios == [3.0, 5.0, 2.0]
    assert spread_row("x", ratios) == ["x", 3, "2.00x", "3.00x", "5.00x", "3.00 5.00 2.00"]
    assert spread_row("y", []) == ["y", 0, "-", "-", "-", "-"]


def test_the_serving_targets_are_judged_met_or_missed():
    """Issue 17: the serving section says which target this run met and which it missed (a missed
    one stays marked missed), from the median per-round ratios."""
    rows = targets(3.5, 2.8, 1.24, True, 16)
    assert [r[2] for r in rows] == ["missed", "met", "met", "met"]
    assert rows[0][1] == "3.50x" and "<= 3x" in rows[0][0]
    rows = targets(None, 3.0, 0.55, False, 16)
    assert [r[2] for r in rows] == ["not measured", "met", "missed", "missed"]


def test_ceiling_graphs_keep_the_signature_and_cost_nothing(tiny_export, tmp_path):
    """bench/ceiling.py: the null graph answers with zeros of the shapes the real graph would give
    (dynamic dims from the inputs), under the same input and output names and types."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import pytest  # noqa: PLC0415

    from bench.ceiling import null_graph  # noqa: PLC0415
    from export.ort_session import session  # noqa: PLC0415

    def signature(path):
        g = onnx.load(str(path)).graph
        return [(x.name, x.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]) for x in [*g.input, *g.output]]

    for name in ("query_intent", "ranker"):
        src = tiny_export / f"{name}.onnx"
        dst = null_graph(src, tmp_path / f"{name}_null.onnx")
        assert signature(dst) == signature(src)
        real, null = session(src), session(dst)
        feeds = {}
        for x in real.get_inputs():
            shape = [3 if d == "batch" else 7 if isinstance(d, str) else d for d in x.shape]
            feeds[x.name] = (np.ones(shape, np.int64) if "int64" in x.type else np.random.rand(*shape).astype(np.float32))
        for want, got in zip(real.run(None, feeds), null.run(None, feeds)):
            assert got.shape == want.shape and got.dtype == want.dtype and not got.any()
        assert len(onnx.load(str(dst)).graph.initializer) == 0   # no weights: next to no compute

    g = onnx.load(str(tiny_export / "ranker.onnx"))
    g.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "not_on_any_input"
    onnx.save(g, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValueError, match="not_on_any_input"):
        null_graph(tmp_path / "bad.onnx", tmp_path / "bad_null.onnx")
