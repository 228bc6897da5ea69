"""The export pipeline as a list of small checked steps, each with a status and a duration:

  data -> tokenizer -> train (or load checkpoint) -> evaluate + gates -> onnx export + checker
  -> parity -> student -> int8 -> tensorrt -> metadata -> publish

Everything is written into a temporary directory inside the export root and renamed to
`<root>/<N>/` only when every gate passed; on any error the temporary directory is removed."""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from . import artifacts, metrics
from .bench import intent_feeds, ranker_feeds, speedup
from .config import Profile
from .data import ensure_dataset, write_npz
from .errors import CheckpointError, GateError
from .features import build_item_features
from .models import QueryIntentModel, Ranker
from .onnx_export import (
    export_query_intent,
    export_ranker,
    io_spec,
    ort_intent,
    ort_ranker_scores,
    parity_query_intent,
    parity_ranker,
)
from .quantize import int8_guard, quantize_int8, student_guard
from .tensorrt import build_and_check
from .tokenizer import Tokenizer
from .train import (
    aux_sizes_for,
    encode_queries,
    make_progress,
    predict,
    ranker_scores,
    softmax_np,
    train_ranker,
    train_student,
    train_student_ranker,
    train_teacher,
)

CKPT_FORMAT = "triton-hybrid-export-checkpoint/1"

REFERENCE = {
    "query_model": "query_intent.onnx",
    "ranker_model": "ranker.onnx",
    "tokenizer": "tokenizer.json, encoded with export/tokenizer.py Tokenizer.encode_batch",
    "intent_probs": "softmax(intent_logits) in float32: exp(l - max(l)) / sum",
    "intent_name": "intents.json[argmax(intent_logits)]",
    "intent_score": "max(intent_probs)",
    "dedupe": "duplicate candidate ids ranked once, at their first position",
    "feature_lookup": "item_features.npz: features row whose item_ids equals the candidate id; unknown id -> the cold-start row (all zeros), counted; strict mode: error",
    "ranker_input": "item_features [1, N, feat_dim] in request order; query_embedding, intent_probs [1, ...]",
    "order": "descending score; ties keep candidate order (stable sort); top_k first",
    "implementation": "export/reference.py ReferencePipeline, export/ranking.py",
}

# TensorRT optimization-profile limits of the ranker plan (model_repository's max_candidates
# default is 1000, its max_batch_size 8; the plan covers both with room).
PLAN_MAX_CANDIDATES = 1000
PLAN_MAX_RANKER_BATCH = 16


@dataclass
class Step:
    name: str
    status: str = "ok"
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    path: Path
    metadata: dict


class Steps:
    def __init__(self, console: Console | None):
        self.items: list[Step] = []
        self.console = console

    def run(self, name: str, fn, *a, **kw):
        step = Step(name)
        self.items.append(step)
        t = time.perf_counter()
        try:
            out = fn(step, *a, **kw)
        except Exception:
            step.status = "failed"
            raise
        finally:
            step.seconds = round(time.perf_counter() - t, 3)
            if self.console:
                colour = {"ok": "green", "kept": "green", "skipped": "yellow", "rejected": "yellow"}.get(step.status, "red")
                self.console.print(f"[{colour}]{step.status:>8}[/] {name} ({step.seconds:.1f}s)"
                                   + (f" - {step.detail.get('reason')}" if step.detail.get("reason") else ""))
        return out


def save_checkpoint(path: Path, profile: Profile, seed: int, tok: Tokenizer, num_intents: int,
                    aux_sizes: dict, layout: dict, feat_dim: int, teacher, student, ranker, student_ranker) -> None:
    torch.save({"format": CKPT_FORMAT, "profile": profile.name, "seed": seed, "tokenizer": tok.to_dict(),
                "num_intents": num_intents, "aux_sizes": aux_sizes, "layout": layout, "feat_dim": feat_dim,
                "teacher": teacher.state_dict(), "student": student.state_dict(), "ranker": ranker.state_dict(),
                "student_ranker": student_ranker.state_dict()},
               path)


def load_checkpoint(path: Path, profile: Profile, num_intents: int, aux_sizes: dict, layout: dict, feat_dim: int):
    """-> (tokenizer, teacher, student, ranker, student ranker or None where the checkpoint predates
    it); any problem is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} does not load: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an export checkpoint ({CKPT_FORMAT})")
    if ck["profile"] != profile.name or ck["num_intents"] != num_intents or ck["feat_dim"] != feat_dim:
        raise CheckpointError(f"checkpoint {path} was trained for profile {ck['profile']!r} "
                              f"({ck['num_intents']} intents, {ck['feat_dim']} features), not this data/profile")
    try:
        tok = Tokenizer.from_dict(ck["tokenizer"])
        teacher = QueryIntentModel(tok.vocab_size, tok.max_len, profile.teacher, num_intents, aux_sizes)
        teacher.load_state_dict(ck["teacher"])
        student = QueryIntentModel(tok.vocab_size, tok.max_len, profile.student, num_intents, {})
        student.load_state_dict(ck["student"])
        ranker = Ranker(profile.teacher.emb_dim, num_intents, feat_dim, layout, profile.train.ranker_hidden,
                        copy.deepcopy(teacher.aux))
        ranker.load_state_dict(ck["ranker"])
        student_ranker = None
        if "student_ranker" in ck:
            student_ranker = Ranker(profile.student.emb_dim, num_intents, feat_dim, layout,
                                    profile.train.student_ranker_hidden or profile.train.ranker_hidden,
                                    copy.deepcopy(teacher.aux))
            student_ranker.load_state_dict(ck["student_ranker"])
            student_ranker.eval()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} does not fit the models of profile {profile.name!r}: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
    return tok, teacher.eval(), student.eval(), ranker.eval(), student_ranker


def check_gates(values: dict, gates) -> list[dict]:
    """The blocking gates; each row: name, value, op, threshold, passed."""
    rows = [
        ("intent_top1_accuracy", values["intent_acc"], ">=", gates.intent_acc_min),
        ("ranker_ndcg@10", values["ndcg"], ">=", gates.ndcg_min),
        ("ranker_ndcg@10_minus_popularity", values["ndcg"] - values["popularity_ndcg"], ">=", gates.ndcg_margin_min),
    ]
    if "parity_query_intent" in values:
        rows += [("parity_query_intent_max_abs_diff", values["parity_query_intent"], "<=", gates.parity_max_abs_diff),
                 ("parity_ranker_max_abs_diff", values["parity_ranker"], "<=", gates.parity_max_abs_diff),
                 ("parity_inputs", values["parity_inputs"], ">=", gates.parity_min_inputs)]
    out = []
    for name, v, op, thr in rows:
        ok = v >= thr if op == ">=" else v <= thr
        out.append({"name": name, "value": round(float(v), 6), "op": op, "threshold": thr, "passed": bool(ok)})
    return out


def _raise_failed(rows: list[dict]) -> None:
    bad = [r for r in rows if not r["passed"]]
    if bad:
        raise GateError("gate failed: " + "; ".join(f"{r['name']} = {r['value']:.4f}, needs {r['op']} {r['threshold']}"
                                                    for r in bad))


def gate_table(rows: list[dict]) -> Table:
    t = Table(title="gates (held-out)")
    for c in ("gate", "value", "threshold", "result"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], f"{r['value']:.6g}", f"{r['op']} {r['threshold']}",
                  "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    return t


def run_export(profile: Profile, seed: int, out_root: Path | str = artifacts.DEFAULT_ROOT,
               version: int | None = None, data_root: Path | str | None = None,
               checkpoint: Path | str | None = None, progress: bool = True,
               console: Console | None = None) -> ExportResult:
    t_start = time.perf_counter()
    out_root = Path(out_root)
    data_root = Path(data_root) if data_root else out_root.parent / "data"
    if version is not None:
        artifacts.check_version_free(out_root, version)
    # one intra-op thread: the models are small, and on a shared 2-core machine OpenMP spinning with
    # several threads per process slows training down by orders of magnitude
    torch.set_num_threads(int(os.environ.get("TRITON_HYBRID_EXPORT_THREADS", "1")))
    steps = Steps(console)
    g = profile.gates

    def s_data(step):
        ds, d = ensure_dataset(profile, seed, data_root)
        step.detail = {"dir": str(d), "items": len(ds.catalog), "leaves": len(ds.catalog.leaves),
                       "train_queries": len(ds.train), "heldout_queries": len(ds.heldout)}
        return ds, d
    ds, data_dir = steps.run("data", s_data)
    cat = ds.catalog
    num_intents = len(cat.leaves)
    aux_sizes = aux_sizes_for(ds)
    features, layout = build_item_features(cat)

    tmp = None
    try:
        tmp = artifacts.make_temp_dir(out_root)

        def s_models(step):
            student_ranker = None
            if checkpoint:
                step.detail = {"checkpoint": str(checkpoint)}
                tok, teacher, student, ranker, student_ranker = load_checkpoint(
                    Path(checkpoint), profile, num_intents, aux_sizes, layout, features.shape[1])
                enc = encode_queries(tok, ds.train, aux_sizes)
            else:
                tok = Tokenizer.build([q["query"] for q in ds.train] + cat.titles, profile.tokenizer.max_len,
                                      profile.tokenizer.min_word_count, profile.tokenizer.min_trigram_count)
                enc = encode_queries(tok, ds.train, aux_sizes)
            with make_progress(progress) as prog:
                if not checkpoint:
                    teacher = train_teacher(profile, tok, enc, num_intents, aux_sizes, seed, prog)
                    student = train_student(profile, tok, enc, teacher, num_intents, seed, prog)
                    ranker = train_ranker(profile, teacher, enc, ds.train, features, layout, num_intents, seed, prog)
                if student_ranker is None:   # also for a checkpoint written before the student had its own
                    student_ranker = train_student_ranker(profile, student, teacher, ranker, enc, ds.train, features,
                                                          layout, num_intents, seed, prog)
            step.detail = {**step.detail, "vocab_size": tok.vocab_size}
            return tok, teacher, student, ranker, student_ranker
        tok, teacher, student, ranker, student_ranker = steps.run("train" if not checkpoint else "load_checkpoint",
                                                                  s_models)
        held = encode_queries(tok, ds.heldout, aux_sizes)
        rels = [q["relevance"] for q in ds.heldout]

        def s_eval(step):
            logits, emb = predict(teacher, held.ids, held.mask)
            probs = softmax_np(logits)
            vals = {"intent_acc": metrics.accuracy(logits, held.intent),
                    "ndcg": metrics.mean_ndcg(ranker_scores(ranker, emb, probs, ds.heldout, features), rels),
                    "popularity_ndcg": metrics.popularity_baseline(ds.heldout, cat.popularity)}
            step.detail = {k: round(v, 4) for k, v in vals.items()}
            rows = check_gates(vals, g)
            if console:
                console.print(gate_table(rows))
            _raise_failed(rows)
            return vals, emb, probs
        torch_vals, t_emb, t_probs = steps.run("evaluate_pytorch", s_eval)

        # ---- artifacts other than models
        tok.save(tmp / "tokenizer.json")
        (tmp / "intents.json").write_text(json.dumps(cat.leaves, indent=1) + "\n", encoding="utf-8")
        write_npz(tmp / "item_features.npz", item_ids=cat.item_ids, features=features, category=cat.leaf,
                  brand=cat.brand, popularity=cat.popularity, price=cat.price,
                  titles=np.array(cat.titles, dtype=np.str_))
        heldout_json = [{"query": q["query"], "candidate_ids": cat.item_ids[np.asarray(q["candidates"])].tolist(),
                         "intent": cat.leaves[q["intent"]], "relevance": q["relevance"]}
                        for q in ds.heldout[: profile.heldout_export_count]]
        (tmp / "heldout_queries.json").write_text(json.dumps(heldout_json) + "\n", encoding="utf-8")
        save_checkpoint(tmp / "checkpoint.pt", profile, seed, tok, num_intents, aux_sizes, layout,
                        features.shape[1], teacher, student, ranker, student_ranker)

        def s_onnx(step):
            export_query_intent(teacher, tok.max_len, tmp / "query_intent.onnx", profile.opset)
            export_ranker(ranker, profile.teacher.emb_dim, num_intents, features.shape[1], tmp / "ranker.onnx",
                          profile.opset)
            step.detail = {"opset": profile.opset, "checker": "passed"}
        steps.run("onnx_export", s_onnx)

        def s_parity(step):
            pq = parity_query_intent(teacher, tmp / "query_intent.onnx", held.ids, held.mask)
            pr = parity_ranker(ranker, tmp / "ranker.onnx", t_emb, t_probs, ds.heldout, features)
            step.detail = {"query_intent": pq, "ranker": pr}
            return pq, pr
        pq, pr = steps.run("parity_fp32", s_parity)

        def s_eval_onnx(step):
            logits, emb = ort_intent(tmp / "query_intent.onnx", held.ids, held.mask)
            probs = softmax_np(logits)
            vals = {"intent_acc": metrics.accuracy(logits, held.intent),
                    "ndcg": metrics.mean_ndcg(ort_ranker_scores(tmp / "ranker.onnx", emb, probs, ds.heldout,
                                                                features), rels),
                    "popularity_ndcg": torch_vals["popularity_ndcg"],
                    "parity_query_intent": pq["max"], "parity_ranker": pr["max"],
                    "parity_inputs": min(pq["n_inputs"], pr["n_inputs"])}
            rows = check_gates(vals, g)
            step.detail = {"gates": rows}
            if console:
                console.print(gate_table(rows))
            _raise_failed(rows)
            return vals, rows, emb, probs
        onnx_vals, gate_rows, o_emb, o_probs = steps.run("evaluate_onnx_fp32", s_eval_onnx)

        qi_feeds64 = intent_feeds(held.ids, held.mask, 64)
        qi_feeds1 = intent_feeds(held.ids, held.mask, 1)
        variants: dict[str, dict] = {}

        def s_student(step):
            path, rpath = tmp / "query_intent_student.onnx", tmp / "ranker_student.onnx"
            export_query_intent(student, tok.max_len, path, profile.opset)
            export_ranker(student_ranker, profile.student.emb_dim, num_intents, features.shape[1], rpath, profile.opset)
            p = parity_query_intent(student, path, held.ids, held.mask)
            s_logits, s_emb = ort_intent(path, held.ids, held.mask)
            s_probs = softmax_np(s_logits)
            pr_s = parity_ranker(student_ranker, rpath, s_emb, s_probs, ds.heldout, features)
            acc = metrics.accuracy(s_logits, held.intent)
            ndcg = metrics.mean_ndcg(ort_ranker_scores(tmp / "ranker.onnx", s_emb, s_probs, ds.heldout, features), rels)
            ndcg_own = metrics.mean_ndcg(ort_ranker_scores(rpath, s_emb, s_probs, ds.heldout, features), rels)
            sp64 = speedup(tmp / "query_intent.onnx", path, qi_feeds64, profile.bench_repeats)
            sp1 = speedup(tmp / "query_intent.onnx", path, qi_feeds1, profile.bench_repeats)
            kept, reason = student_guard(onnx_vals["intent_acc"], acc, sp64["speedup"], g.student_max_drop,
                                         g.student_min_speedup)
            if not kept:
                path.unlink()
                rpath.unlink()
            step.status = "kept" if kept else "rejected"
            step.detail = {"kept": kept, "reason": reason, "intent_acc": round(acc, 4),
                           "teacher_intent_acc": round(onnx_vals["intent_acc"], 4),
                           "ndcg_with_ranker": round(ndcg, 4), "ndcg_with_student_ranker": round(ndcg_own, 4),
                           "fp32_ndcg": round(onnx_vals["ndcg"], 4), "speedup_batch64": sp64, "speedup_batch1": sp1,
                           "parity_vs_pytorch": p, "ranker_parity_vs_pytorch": pr_s,
                           "file": path.name if kept else None, "ranker_file": rpath.name if kept else None}
            variants["query_intent_student"] = step.detail
        steps.run("student", s_student)

        def s_int8(step):
            qpath, rpath = tmp / "query_intent_int8.onnx", tmp / "ranker_int8.onnx"
            quantize_int8(tmp / "query_intent.onnx", qpath)
            quantize_int8(tmp / "ranker.onnx", rpath)
            q_logits, _ = ort_intent(qpath, held.ids, held.mask)
            q_acc = metrics.accuracy(q_logits, held.intent)
            r_ndcg = metrics.mean_ndcg(ort_ranker_scores(rpath, o_emb, o_probs, ds.heldout, features), rels)
            qk, qreason = int8_guard(onnx_vals["intent_acc"], q_acc, g.int8_max_drop)
            rk, rreason = int8_guard(onnx_vals["ndcg"], r_ndcg, g.int8_max_drop)
            rf64 = ranker_feeds(profile.teacher.emb_dim, num_intents, features, 64, 50)
            rf1 = ranker_feeds(profile.teacher.emb_dim, num_intents, features, 1, 50)
            variants["query_intent_int8"] = {
                "kept": qk, "reason": qreason, "intent_acc": round(q_acc, 4),
                "fp32_intent_acc": round(onnx_vals["intent_acc"], 4),
                "speedup_batch64": speedup(tmp / "query_intent.onnx", qpath, qi_feeds64, profile.bench_repeats),
                "speedup_batch1": speedup(tmp / "query_intent.onnx", qpath, qi_feeds1, profile.bench_repeats),
                "file": qpath.name if qk else None}
            variants["ranker_int8"] = {
                "kept": rk, "reason": rreason, "ndcg": round(r_ndcg, 4), "fp32_ndcg": round(onnx_vals["ndcg"], 4),
                "speedup_batch64": speedup(tmp / "ranker.onnx", rpath, rf64, profile.bench_repeats),
                "speedup_batch1": speedup(tmp / "ranker.onnx", rpath, rf1, profile.bench_repeats),
                "file": rpath.name if rk else None}
            if not qk:
                qpath.unlink()
            if not rk:
                rpath.unlink()
            step.status = "ok" if (qk and rk) else "rejected" if not (qk or rk) else "partial"
            step.detail = {"reason": f"query_intent {qreason}; ranker {rreason}"}
        steps.run("int8", s_int8)

        def s_trt(step):
            n = 256
            qi_ref = ort_intent(tmp / "query_intent.onnx", held.ids[:n], held.mask[:n])
            L = tok.max_len
            qi = build_and_check(tmp / "query_intent.onnx", tmp / "query_intent_fp16.plan",
                                 {"input_ids": ((1, L), (64, L), (256, L)),
                                  "attention_mask": ((1, L), (64, L), (256, L))},
                                 {"input_ids": held.ids[:n], "attention_mask": held.mask[:n]},
                                 {"intent_logits": qi_ref[0], "query_embedding": qi_ref[1]},
                                 g.tensorrt_fp16_max_abs_diff)
            E, F = profile.teacher.emb_dim, features.shape[1]
            rfeeds = ranker_feeds(E, num_intents, features, 64, 50)
            from .ort_session import session  # noqa: PLC0415 - deferred: pulls in onnxruntime
            r_ref = session(tmp / "ranker.onnx").run(["scores"], rfeeds)[0]
            # The plan must take what the repository admits: up to PLAN_MAX_CANDIDATES candidates
            # (the ensemble's default max_candidates) in batches up to PLAN_MAX_RANKER_BATCH.
            nb, nc = PLAN_MAX_RANKER_BATCH, PLAN_MAX_CANDIDATES
            rk = build_and_check(tmp / "ranker.onnx", tmp / "ranker_fp16.plan",
                                 {"query_embedding": ((1, E), (8, E), (nb, E)),
                                  "intent_probs": ((1, num_intents), (8, num_intents), (nb, num_intents)),
                                  "item_features": ((1, 1, F), (8, 50, F), (nb, nc, F))},
                                 rfeeds, {"scores": r_ref}, g.tensorrt_fp16_max_abs_diff)
            step.status = qi["status"] if qi["status"] == rk["status"] else "mixed"
            step.detail = {"query_intent": qi, "ranker": rk, "reason": qi.get("reason") or rk.get("reason")}
            if console and qi["status"] == "skipped":
                console.print(f"[yellow]TensorRT FP16 step skipped: {qi['reason']}[/]")
            variants["tensorrt_fp16"] = step.detail
        steps.run("tensorrt_fp16", s_trt)

        # ---- metadata
        final_version = version if version is not None else artifacts.next_version(out_root)
        models = {"query_intent": {"file": "query_intent.onnx", **io_spec(tmp / "query_intent.onnx")},
                  "ranker": {"file": "ranker.onnx", **io_spec(tmp / "ranker.onnx")}}
        for key, fname in (("query_intent_student", "query_intent_student.onnx"), ("ranker_student", "ranker_student.onnx"),
                           ("query_intent_int8", "query_intent_int8.onnx"), ("ranker_int8", "ranker_int8.onnx")):
            if (tmp / fname).exists():
                models[key] = {"file": fname, **io_spec(tmp / fname)}
        for key, fname in (("query_intent_fp16_plan", "query_intent_fp16.plan"), ("ranker_fp16_plan", "ranker_fp16.plan")):
            if (tmp / fname).exists():
                models[key] = {"file": fname, "platform": "tensorrt_plan", "precision": "FP16",
                               "onnx_source": fname.replace("_fp16.plan", ".onnx")}
        manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
        meta = {
            "format": "triton-hybrid-export/1",
            "version": final_version,
            "profile": profile.name,
            "seed": seed,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source_commit": artifacts.source_commit(),
            "opset": profile.opset,
            "models": models,
            "variants": variants,
            "metrics": {"pytorch": {k: round(v, 6) for k, v in torch_vals.items()},
                        "onnx_fp32": {k: round(float(v), 6) for k, v in onnx_vals.items()},
                        "heldout_queries": len(ds.heldout)},
            "gates": {"thresholds": asdict(g), "results": gate_rows, "passed": all(r["passed"] for r in gate_rows)},
            "parity": {"query_intent": pq, "ranker": pr},
            "tokenizer": {"file": "tokenizer.json", "vocab_size": tok.vocab_size, "max_len": tok.max_len,
                          "seq_len": "fixed (= max_len); batch is dynamic"},
            "intents": {"file": "intents.json", "count": num_intents},
            "item_features": {"file": "item_features.npz", "num_items": len(cat), "feat_dim": int(features.shape[1]),
                              "layout": layout, "arrays": ["item_ids", "features", "category", "brand",
                                                           "popularity", "price", "titles"]},
            "heldout": {"file": "heldout_queries.json", "count": len(heldout_json)},
            "checkpoint": {"file": "checkpoint.pt", "format": CKPT_FORMAT},
            "reference": REFERENCE,
            "data": {"dir": str(data_dir), "files_sha256": manifest["files"], "items": len(cat),
                     "leaves": num_intents},
            "profile_config": profile.to_dict(),
            "steps": [{"name": s.name, "status": s.status, "seconds": s.seconds, "reason": s.detail.get("reason")}
                      for s in steps.items],
            "export_seconds": round(time.perf_counter() - t_start, 2),
        }
        meta = artifacts.write_metadata(tmp, meta)
        final = artifacts.publish(tmp, out_root, final_version)
        tmp = None
        if console:
            console.print(f"[bold green]export {final_version} written to {final}[/] "
                          f"({meta['export_seconds']:.1f}s)")
        return ExportResult(final, meta)
    finally:
        artifacts.discard(tmp)
