"""Typed profiles of the export pipeline: every size, epoch count and threshold lives here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class DataConfig:
    n_items: int
    n_brands: int
    n_train_queries: int
    n_heldout_queries: int
    min_candidates: int
    max_candidates: int
    typo_prob: float = 0.08        # per word (words of 4+ letters)
    shuffle_prob: float = 0.3      # word-order noise, per query
    filler_prob: float = 0.3       # add a filler word ("cheap", "new", ...), per query
    synonym_prob: float = 0.4      # use a synonym instead of the canonical word


@dataclass(frozen=True)
class TokenizerConfig:
    max_len: int = 16
    min_word_count: int = 2
    min_trigram_count: int = 2


@dataclass(frozen=True)
class EncoderConfig:
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    emb_dim: int
    dropout: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    teacher_epochs: int
    student_epochs: int
    ranker_epochs: int
    batch_size: int = 128
    ranker_batch_size: int = 32
    lr: float = 2e-3
    ranker_lr: float = 2e-3
    distill_temperature: float = 2.0
    # Weight of the student's attribute-head distillation (0: off), see export.train.train_student.
    student_attr_distill: float = 0.0
    ranker_hidden: int = 64
    # The student's own ranker (trained on student embeddings, distilled from the FP32 pipeline):
    # its width (None: the FP32 ranker's, starting from a copy of it), epochs, and the learning
    # rate of a copy being fine-tuned (a narrower one trains from scratch at ranker_lr).
    student_ranker_hidden: int | None = None
    student_ranker_epochs: int = 1
    student_ranker_lr: float = 5e-4


@dataclass(frozen=True)
class Gates:
    intent_acc_min: float            # top-1 accuracy of the teacher on held-out queries
    ndcg_min: float                  # ranker NDCG@10 on held-out queries
    ndcg_margin_min: float           # ranker NDCG@10 minus popularity-only NDCG@10
    parity_max_abs_diff: float = 1e-4        # FP32 ONNX vs PyTorch
    parity_min_inputs: int = 1000
    int8_max_drop: float = 0.005             # 0.5 point of accuracy / NDCG
    student_max_drop: float = 0.01           # 1 point of accuracy
    student_min_speedup: float = 2.0         # onnxruntime, batch 64
    tensorrt_fp16_max_abs_diff: float = 5e-2  # looser bound for the FP16 plan


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig
    tokenizer: TokenizerConfig
    teacher: EncoderConfig
    student: EncoderConfig
    train: TrainConfig
    gates: Gates
    opset: int = 17
    heldout_export_count: int = 500      # entries of heldout_queries.json
    bench_repeats: int = 30

    def to_dict(self) -> dict:
        return asdict(self)

    def with_gates(self, **kw) -> "Profile":
        return replace(self, gates=replace(self.gates, **kw))


TINY = Profile(
    name="tiny",
    data=DataConfig(n_items=3000, n_brands=30, n_train_queries=5000, n_heldout_queries=1000,
                    min_candidates=20, max_candidates=50),
    tokenizer=TokenizerConfig(max_len=16),
    teacher=EncoderConfig(d_model=64, n_heads=4, n_layers=2, d_ff=128, emb_dim=64),
    student=EncoderConfig(d_model=48, n_heads=2, n_layers=1, d_ff=96, emb_dim=64),
    train=TrainConfig(teacher_epochs=10, student_epochs=20, ranker_epochs=4, ranker_hidden=48),
    # The tiny profile trains on little data for a few seconds: lower bars, same margin.
    gates=Gates(intent_acc_min=0.80, ndcg_min=0.75, ndcg_margin_min=0.15),
    bench_repeats=15,
)

FULL = Profile(
    name="full",
    data=DataConfig(n_items=20000, n_brands=50, n_train_queries=40000, n_heldout_queries=2000,
                    min_candidates=20, max_candidates=100),
    tokenizer=TokenizerConfig(max_len=16),
    teacher=EncoderConfig(d_model=128, n_heads=4, n_layers=2, d_ff=256, emb_dim=96),
    # One layer at d=96 with attribute-head distillation: at d=64 the held-out NDCG@10 stayed
    # 1.4 points under FP32's, and distilling the attribute heads into it cost 1.25 points of
    # intent accuracy (past the gate); d=96 keeps both (measured in docs/models.md).
    student=EncoderConfig(d_model=96, n_heads=4, n_layers=1, d_ff=192, emb_dim=96),
    # The student serves with its own narrower ranker (the FP32 ranker is the wider one).
    train=TrainConfig(teacher_epochs=4, student_epochs=8, ranker_epochs=3, ranker_hidden=96,
                      student_ranker_hidden=64, student_ranker_epochs=2, student_attr_distill=1.0),
    gates=Gates(intent_acc_min=0.90, ndcg_min=0.85, ndcg_margin_min=0.15),
)

PROFILES: dict[str, Profile] = {"tiny": TINY, "full": FULL}
DEFAULT_SEED = 1234


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
