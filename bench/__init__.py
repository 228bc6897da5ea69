"""Side-by-side benchmarks of the stack (issue 10): `python -m bench.run --out BENCHMARKS.md`.

One module per section; each `run(ctx) -> Section` measures a figure and its reference in the same
run and returns a markdown block. Benchmarks print figures; they never pass or fail on times."""
