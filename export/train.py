"""Training loops (CPU, minutes): teacher query-intent encoder with attribute auxiliary heads,
distilled student, and the listwise ranker. Each shows a rich progress bar when asked."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .config import Profile
from .data import Dataset
from .ranking import softmax
from .features import ATTRS
from .models import QueryIntentModel, Ranker
from .tokenizer import Tokenizer


@dataclass
class Encoded:
    ids: np.ndarray        # int64 [Q, L]
    mask: np.ndarray       # int64 [Q, L]
    intent: np.ndarray     # int64 [Q]
    aux: dict[str, np.ndarray]   # attribute label, n = "none"


def encode_queries(tok: Tokenizer, queries: list[dict], aux_sizes: dict[str, int]) -> Encoded:
    ids, mask = tok.encode_batch([q["query"] for q in queries])
    aux = {}
    for k in ATTRS:
        v = np.array([q["spec"][k] for q in queries], np.int64)
        aux[k] = np.where(v < 0, aux_sizes[k] - 1, v)
    return Encoded(ids, mask, np.array([q["intent"] for q in queries], np.int64), aux)


def aux_sizes_for(ds: Dataset) -> dict[str, int]:
    c = ds.catalog
    return {"brand": len(c.brands) + 1, "colour": len(c.colours) + 1,
            "material": len(c.materials) + 1, "size": len(c.sizes) + 1}


def make_progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=False)


def _batches(n: int, bs: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for i in range(0, n, bs):
        yield perm[i:i + bs]


def _schedule(opt, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) *
                                             max(0.05, 1 - s / max(1, total)))


def _optimize(opt, epochs: int, n: int, batch_size: int, seed: int, progress, name: str, loss_of) -> None:
    """The loop the three trainers share: `epochs` passes over n examples in shuffled batches,
    one optimizer and schedule step per batch on loss_of(batch indices), progress as task `name`."""
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = _schedule(opt, steps)
    rng = np.random.default_rng(seed)
    task = progress.add_task(name, total=steps, loss=0.0) if progress else None
    for _ in range(epochs):
        for b in _batches(n, batch_size, rng):
            loss = loss_of(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress.update(task, advance=1, loss=loss.item())


def train_teacher(profile: Profile, tok: Tokenizer, enc: Encoded, num_intents: int, aux_sizes: dict[str, int],
                  seed: int, progress=None) -> QueryIntentModel:
    torch.manual_seed(seed)
    cfg = profile.train
    model = QueryIntentModel(tok.vocab_size, tok.max_len, profile.teacher, num_intents, aux_sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    ids, mask, y = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask), torch.from_numpy(enc.intent)
    aux = {k: torch.from_numpy(v) for k, v in enc.aux.items()}

    def loss_of(b):
        b = torch.from_numpy(b)
        logits, emb = model(ids[b], mask[b])
        loss = F.cross_entropy(logits, y[b])
        for k, lg in model.aux_logits(emb).items():
            loss = loss + 0.5 * F.cross_entropy(lg, aux[k][b])
        return loss

    model.train()
    _optimize(opt, cfg.teacher_epochs, len(enc.intent), cfg.batch_size, seed, progress, "teacher", loss_of)
    return model.eval()


def train_student(profile: Profile, tok: Tokenizer, enc: Encoded, teacher: QueryIntentModel, num_intents: int,
                  seed: int, progress=None) -> QueryIntentModel:
    """Distillation: KL to the teacher's softened intent distribution, MSE to the teacher's
    embedding (so the ranker accepts the student's embedding), the true intent label, and (weight
    `student_attr_distill`) KL of the teacher's frozen attribute heads read on the student's
    embedding to the same heads on the teacher's: the rankers read brand/colour/material/size
    through those heads, and the MSE alone leaves their answers off where it matters."""
    torch.manual_seed(seed + 1)
    cfg = profile.train
    student = QueryIntentModel(tok.vocab_size, tok.max_len, profile.student, num_intents, {})
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    ids, mask, y = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask), torch.from_numpy(enc.intent)
    with torch.no_grad():
        t_logits, t_emb = predict(teacher, enc.ids, enc.mask)
        t_logits, t_emb = torch.from_numpy(t_logits), torch.from_numpy(t_emb)
    T = cfg.distill_temperature
    w_attr = cfg.student_attr_distill
    heads = copy.deepcopy(teacher.aux)
    for p in heads.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        t_attr = {k: F.softmax(h(t_emb), -1) for k, h in heads.items()}

    def loss_of(b):
        b = torch.from_numpy(b)
        logits, emb = student(ids[b], mask[b])
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(t_logits[b] / T, -1), reduction="batchmean") * T * T
        loss = kd + 0.5 * F.cross_entropy(logits, y[b]) + 5.0 * F.mse_loss(emb, t_emb[b])
        if w_attr:
            loss = loss + w_attr * sum(F.kl_div(F.log_softmax(h(emb), -1), t_attr[k][b], reduction="batchmean")
                                       for k, h in heads.items())
        return loss

    student.train()
    _optimize(opt, cfg.student_epochs, len(y), cfg.batch_size, seed + 1, progress, "student (distill)", loss_of)
    return student.eval()


@torch.no_grad()
def predict(model: QueryIntentModel, ids: np.ndarray, mask: np.ndarray, bs: int = 512) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    outs = [model(torch.from_numpy(ids[i:i + bs]), torch.from_numpy(mask[i:i + bs])) for i in range(0, len(ids), bs)]
    return (torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy())


# float32 softmax, max-subtracted: the one the reference pipeline and the ensemble use.
softmax_np = softmax


def pad_candidates(queries: list[dict], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[Q, Nmax, F] candidate features (zeros as padding) and [Q, Nmax] bool mask."""
    nmax = max(len(q["candidates"]) for q in queries)
    x = np.zeros((len(queries), nmax, features.shape[1]), np.float32)
    m = np.zeros((len(queries), nmax), bool)
    for i, q in enumerate(queries):
        c = np.asarray(q["candidates"])
        x[i, : len(c)] = features[c]
        m[i, : len(c)] = True
    return x, m


def ranking_batch(queries: list[dict], b: np.ndarray, features: np.ndarray):
    """One training batch of queries `b`: (indices, candidate features, mask, ListNet target: each
    candidate's share of the query's 2^relevance - 1 gain), as tensors."""
    qs = [queries[i] for i in b]
    x, m = pad_candidates(qs, features)
    g = np.zeros(m.shape, np.float32)
    for i, q in enumerate(qs):
        g[i, : len(q["relevance"])] = q["relevance"]
    gain = torch.pow(2.0, torch.from_numpy(g)) - 1.0
    target = gain / gain.sum(-1, keepdim=True).clamp(min=1e-9)
    return torch.from_numpy(b), torch.from_numpy(x), torch.from_numpy(m), target


def train_ranker(profile: Profile, teacher: QueryIntentModel, enc: Encoded, queries: list[dict],
                 features: np.ndarray, layout: dict, num_intents: int, seed: int, progress=None) -> Ranker:
    """Listwise (ListNet) training on teacher embeddings/intent probabilities of the training queries."""
    torch.manual_seed(seed + 2)
    cfg = profile.train
    ranker = Ranker(profile.teacher.emb_dim, num_intents, features.shape[1], layout, cfg.ranker_hidden,
                    copy.deepcopy(teacher.aux))
    params = [p for p in ranker.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.ranker_lr, weight_decay=1e-4)
    logits, emb = predict(teacher, enc.ids, enc.mask)
    probs = torch.from_numpy(softmax_np(logits))
    emb = torch.from_numpy(emb)

    def loss_of(b):
        bt, xt, mt, target = ranking_batch(queries, b, features)
        logp = F.log_softmax(ranker(emb[bt], probs[bt], xt).masked_fill(~mt, -1e4), dim=-1)
        return -(target * logp).sum(-1).mean()

    ranker.train()
    _optimize(opt, cfg.ranker_epochs, len(queries), cfg.ranker_batch_size, seed + 2, progress, "ranker", loss_of)
    return ranker.eval()


def train_student_ranker(profile: Profile, student: QueryIntentModel, teacher: QueryIntentModel, ranker: Ranker,
                         enc: Encoded, queries: list[dict], features: np.ndarray, layout: dict, num_intents: int,
                         seed: int, progress=None) -> Ranker:
    """The ranker the student serves with, trained on what it sees when served (the student's
    embeddings and intent probabilities): the ListNet loss on the labels plus distillation to the
    FP32 pipeline's scores (teacher embeddings -> FP32 ranker), softened by `distill_temperature`.
    Its width is `student_ranker_hidden` (the FP32 ranker's when unset: then it starts as a copy
    of the FP32 ranker); the attribute heads it reads the embedding with are trained too."""
    torch.manual_seed(seed + 3)
    cfg = profile.train
    hidden = cfg.student_ranker_hidden or cfg.ranker_hidden
    if hidden == cfg.ranker_hidden:
        srk, lr = copy.deepcopy(ranker), cfg.student_ranker_lr
    else:
        srk, lr = Ranker(profile.student.emb_dim, num_intents, features.shape[1], layout, hidden,
                         copy.deepcopy(teacher.aux)), cfg.ranker_lr
    for p in srk.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(srk.parameters(), lr=lr, weight_decay=1e-4)
    s_logits, s_emb = predict(student, enc.ids, enc.mask)
    t_logits, t_emb = predict(teacher, enc.ids, enc.mask)
    s_probs, s_emb = torch.from_numpy(softmax_np(s_logits)), torch.from_numpy(s_emb)
    t_probs, t_emb = torch.from_numpy(softmax_np(t_logits)), torch.from_numpy(t_emb)
    T = cfg.distill_temperature

    def loss_of(b):
        bt, xt, mt, target = ranking_batch(queries, b, features)
        with torch.no_grad():
            t_scores = ranker(t_emb[bt], t_probs[bt], xt).masked_fill(~mt, -1e4)
        scores = srk(s_emb[bt], s_probs[bt], xt).masked_fill(~mt, -1e4)
        listnet = -(target * F.log_softmax(scores, dim=-1)).sum(-1).mean()
        kd = -(F.softmax(t_scores / T, -1) * F.log_softmax(scores / T, -1)).sum(-1).mean() * T * T
        return listnet + kd

    srk.train()
    _optimize(opt, cfg.student_ranker_epochs, len(queries), cfg.ranker_batch_size, seed + 3, progress,
              "student ranker (distill)", loss_of)
    return srk.eval()


@torch.no_grad()
def ranker_scores(ranker: Ranker, emb: np.ndarray, probs: np.ndarray, queries: list[dict],
                  features: np.ndarray, bs: int = 256) -> list[np.ndarray]:
    ranker.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(queries), bs):
        qs = queries[i:i + bs]
        x, _ = pad_candidates(qs, features)
        s = ranker(torch.from_numpy(emb[i:i + bs]), torch.from_numpy(probs[i:i + bs]), torch.from_numpy(x)).numpy()
        out.extend(s[j, : len(q["candidates"])] for j, q in enumerate(qs))
    return out
