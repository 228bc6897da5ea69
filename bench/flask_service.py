"""What a user would build instead of Triton: a single-process Flask web service that runs the
same pipeline (export.reference.ReferencePipeline: tokenizer -> query_intent.onnx -> feature
lookup -> ranker.onnx -> top-k, onnxruntime) per request. Werkzeug's threaded server, the
`flask run` default: one process, one thread per connection.

    python -m bench.flask_service --export DIR --port 8765
    POST /rank {"query": "...", "candidate_ids": [...], "top_k": 10} -> {"top_ids", "top_scores", "intent", "intent_score"}
"""
from __future__ import annotations

import argparse
import logging


def make_app(export_dir: str):
    from flask import Flask, jsonify, request  # noqa: PLC0415

    from export.reference import ReferencePipeline  # noqa: PLC0415

    pipe = ReferencePipeline(export_dir)
    app = Flask("search_ranking_flask")

    @app.get("/health")
    def health():
        return "ok"

    @app.post("/rank")
    def rank():
        body = request.get_json(force=True)
        try:
            ids, scores, intent, score = pipe.rank(body["query"], body["candidate_ids"], int(body.get("top_k", 10)))
        except (KeyError, ValueError) as e:
            return jsonify({"error": str(e)}), 400
        return jsonify({"top_ids": [int(i) for i in ids], "top_scores": [float(s) for s in scores],
                        "intent": intent, "intent_score": score})
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    make_app(a.export).run(host=a.host, port=a.port, threaded=True)


if __name__ == "__main__":
    main()
