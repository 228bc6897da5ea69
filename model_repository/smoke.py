"""The smoke inference a Triton instance must pass before it goes live: one small valid
`search_ranking` request and a check of the answer against the reference answer stored with it.

The builder writes the request and the reference pipeline's answer to
`search_ranking/<version>/smoke.json`; `smoke_request` also takes an export dir (then there is no
expected answer, and `check_response` checks only the shapes and types).

    inputs, expected = smoke_request(repo_dir)           # or the search_ranking/<v> dir, or an export dir
    result = client.infer("search_ranking", to_infer_inputs(inputs, tritonclient.http))
    problems = check_response({n: result.as_numpy(n) for n in OUTPUTS}, expected)   # [] = fine
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model_repository.spec import ENSEMBLE

OUTPUTS = ("TOP_IDS", "TOP_SCORES", "INTENT", "INTENT_SCORE")
# Checked when the answer has it (repositories built before it existed do not).
OPTIONAL_OUTPUTS = ("UNKNOWN_COUNT",)


def _smoke_file(source: Path) -> Path | None:
    source = Path(source)
    if (source / "smoke.json").is_file():
        return source / "smoke.json"
    versions = sorted((p for p in (source / ENSEMBLE).glob("*") if p.name.isdigit() and (p / "smoke.json").is_file()),
                      key=lambda p: int(p.name))
    return versions[-1] / "smoke.json" if versions else None


def smoke_request(source: str | Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """(inputs {name: array} for search_ranking, expected answer or None) from a repository, an
    ensemble version dir, or an export dir (its first held-out query)."""
    path = _smoke_file(Path(source))
    if path is not None:
        payload = json.loads(path.read_text())
    else:
        held = json.loads((Path(source) / "heldout_queries.json").read_text())
        payload = {"query": held[0]["query"], "candidate_ids": held[0]["candidate_ids"][:50], "top_k": 5}
    inputs = {
        "QUERY": np.array([[payload["query"].encode()]], dtype=object),
        "CANDIDATE_IDS": np.array([payload["candidate_ids"]], dtype=np.int64),
        "TOP_K": np.array([[payload["top_k"]]], dtype=np.int32),
    }
    return inputs, payload.get("expected")


def to_infer_inputs(inputs: dict[str, np.ndarray], client_module) -> list:
    """tritonclient.http or tritonclient.grpc InferInput objects for `inputs`."""
    from tritonclient.utils import np_to_triton_dtype  # noqa: PLC0415

    out = []
    for name, array in inputs.items():
        t = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def check_response(outputs: dict[str, np.ndarray], expected: dict | None = None, atol: float = 1e-4) -> list[str]:
    """Problems with a smoke answer ([] when it is right)."""
    problems = [f"output {n} is missing" for n in OUTPUTS if outputs.get(n) is None]
    if problems:
        return problems
    ids, scores = np.asarray(outputs["TOP_IDS"]).reshape(-1), np.asarray(outputs["TOP_SCORES"]).reshape(-1)
    if ids.size == 0 or ids.size != scores.size:
        problems.append(f"TOP_IDS has {ids.size} ids and TOP_SCORES {scores.size} scores")
    elif np.any(np.diff(scores) > 0):
        problems.append("TOP_SCORES are not in descending order")
    if expected:
        if ids.tolist() != list(expected["top_ids"]):
            problems.append(f"TOP_IDS {ids.tolist()} != expected {expected['top_ids']}")
        elif not np.allclose(scores, expected["top_scores"], atol=atol, rtol=0):
            problems.append(f"TOP_SCORES {scores.tolist()} differ from {expected['top_scores']} by more than {atol}")
        intent = np.asarray(outputs["INTENT"]).reshape(-1)[0]
        intent = intent.decode() if isinstance(intent, bytes) else str(intent)
        if intent != expected["intent"]:
            problems.append(f"INTENT {intent!r} != expected {expected['intent']!r}")
        score = float(np.asarray(outputs["INTENT_SCORE"]).reshape(-1)[0])
        if abs(score - expected["intent_score"]) > atol:
            problems.append(f"INTENT_SCORE {score} != expected {expected['intent_score']}")
        if outputs.get("UNKNOWN_COUNT") is not None and "unknown_count" in expected:
            unknown = int(np.asarray(outputs["UNKNOWN_COUNT"]).reshape(-1)[0])
            if unknown != expected["unknown_count"]:
                problems.append(f"UNKNOWN_COUNT {unknown} != expected {expected['unknown_count']}")
    return problems


def run_smoke(url: str, source: str | Path, protocol: str = "http", timeout_s: float = 10.0) -> list[str]:
    """Send the smoke request to a Triton at `url` (host:port); the problems ([] = passed)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module  # noqa: PLC0415
    else:
        import tritonclient.http as client_module  # noqa: PLC0415
    inputs, expected = smoke_request(source)
    try:
        if protocol == "grpc":
            client = client_module.InferenceServerClient(url)
            result = client.infer(ENSEMBLE, to_infer_inputs(inputs, client_module), client_timeout=timeout_s)
        else:
            client = client_module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
            result = client.infer(ENSEMBLE, to_infer_inputs(inputs, client_module))
    except Exception as e:  # noqa: BLE001 - a failed smoke inference is a finding, not a crash
        return [f"inference failed: {e}"]
    return check_response({n: result.as_numpy(n) for n in OUTPUTS + OPTIONAL_OUTPUTS}, expected)
