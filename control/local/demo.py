"""The short scenario `make demo` runs against the live local stack: ranked answers over HTTP and
gRPC through HAProxy, the traffic split between the sites, a sensitive request pinned on-prem,
then where to look. Run it again any time: `python -m control.local.demo`."""
from __future__ import annotations

import json
import sys

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from control.config import load_config
from export.artifacts import latest_export
from model_repository.smoke import to_infer_inputs

MODEL = "search_ranking"
console = Console()


def ensemble_inputs(module, query: str, candidate_ids: list[int], top_k: int):
    """InferInputs (tritonclient.http or .grpc) of one search_ranking request."""
    return to_infer_inputs({
        "QUERY": np.array([[query.encode()]], dtype=np.object_),
        "CANDIDATE_IDS": np.asarray([candidate_ids], dtype=np.int64),
        "TOP_K": np.array([[top_k]], dtype=np.int32),
    }, module)


def served_per_instance(settings) -> dict[str, float]:
    """`nv_inference_request_success` of the ensemble on each Triton."""
    out = {}
    for inst in settings.instances:
        text = requests.get(inst.metrics_url, timeout=2).text
        out[inst.name] = sum(s.value for f in text_string_to_metric_families(text)
                             if f.name == "nv_inference_request_success"
                             for s in f.samples if s.labels.get("model") == MODEL)
    return out


def heldout_queries(settings, n: int) -> list[dict]:

    path = latest_export(settings.path(settings.models.exports_dir)) / "heldout_queries.json"
    return json.loads(path.read_text())[:n]


def main() -> int:
    settings = load_config()
    h = settings.haproxy
    queries = heldout_queries(settings, 40)
    http = httpclient.InferenceServerClient(f"{h.host}:{h.http_port}")
    grpc = grpcclient.InferenceServerClient(f"{h.host}:{h.grpc_port}")

    console.rule("search_ranking through HAProxy")
    table = Table()
    for col in ("via", "query", "intent (score)", "top 5 item ids", "top score"):
        table.add_column(col)
    for i, q in enumerate(queries[:6]):
        module, client, via = (httpclient, http, "HTTP") if i % 2 == 0 else (grpcclient, grpc, "gRPC")
        r = client.infer(MODEL, ensemble_inputs(module, q["query"], q["candidate_ids"], 5))
        intent = r.as_numpy("INTENT").reshape(-1)[0]
        table.add_row(via, q["query"], f"{intent.decode() if isinstance(intent, bytes) else intent} "
                      f"({float(r.as_numpy('INTENT_SCORE').reshape(-1)[0]):.2f})",
                      " ".join(map(str, r.as_numpy("TOP_IDS").reshape(-1).tolist())),
                      f"{float(r.as_numpy('TOP_SCORES').reshape(-1)[0]):.3f}")
    console.print(table)

    before = served_per_instance(settings)
    for q in queries:
        http.infer(MODEL, ensemble_inputs(httpclient, q["query"], q["candidate_ids"], 10))
    after = served_per_instance(settings)
    split = {n: after[n] - before[n] for n in after}
    console.print(f"{len(queries)} requests through HAProxy, served per instance: {split}")

    before = served_per_instance(settings)
    for q in queries[:10]:
        http.infer(MODEL, ensemble_inputs(httpclient, q["query"], q["candidate_ids"], 10),
                   headers={h.sensitive_header: "1"})
    after = served_per_instance(settings)
    console.print(f"10 requests marked {h.sensitive_header}: 1, served per instance: "
                  f"{ {n: after[n] - before[n] for n in after} } (sensitive traffic never leaves on-prem)")

    console.rule("where to look")
    c = settings.control
    console.print("status          : .venv/bin/triton-hybrid status")
    console.print("model versions  : .venv/bin/triton-hybrid versions  (desired, rejected, what each agent serves)")
    console.print("rollouts        : .venv/bin/triton-hybrid rollout status")
    console.print(f"HAProxy stats   : http://{h.host}:{h.stats_port}/stats")
    console.print("Triton metrics  : " + ", ".join(i.metrics_url for i in settings.instances))
    console.print("host agents     : " + ", ".join(f"{i.agent_url}/ready" for i in settings.instances if i.agent_url))
    console.print(f"control plane   : http://{c.api_host}:{c.api_port} (token from the config), "
                  f"metrics http://{c.api_host}:{c.metrics_port}/metrics")
    console.print(f"logs            : {settings.run_path}/logs/")
    console.print("stop            : make down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
