"""PyTorch models: the query-intent Transformer encoder (teacher and distilled student) and the
ranker. Written with plain ops (no fused nn.MultiheadAttention fast path) so that the TorchScript
ONNX exporter gives a graph that matches PyTorch closely."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import EncoderConfig

NEG = -1e4   # additive attention mask for padding (finite: no NaN for odd inputs)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, l, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + bias   # [b,h,l,l]
        h = torch.matmul(self.drop(torch.softmax(att, dim=-1)), v)              # [b,h,l,dh]
        h = h.permute(0, 2, 1, 3).reshape(b, l, d)
        x = x + self.drop(self.out(h))
        return x + self.drop(self.ff(self.ln2(x)))


class QueryIntentModel(nn.Module):
    """input_ids, attention_mask [B, L] int64 -> intent_logits [B, num_intents], query_embedding [B, emb_dim].
    `aux_sizes` are training-only heads (brand/colour/material/size, each with a 'none' class) that
    make the embedding carry what the ranker needs; they are not part of the exported graph."""

    def __init__(self, vocab_size: int, max_len: int, cfg: EncoderConfig, num_intents: int,
                 aux_sizes: dict[str, int]):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.d_model, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_len, cfg.d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Sequential(nn.Linear(cfg.d_model, cfg.emb_dim), nn.LayerNorm(cfg.emb_dim))
        self.intent = nn.Linear(cfg.emb_dim, num_intents)
        self.aux = nn.ModuleDict({k: nn.Linear(cfg.emb_dim, n) for k, n in aux_sizes.items()})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.to(torch.float32)
        x = self.tok(input_ids) + self.pos[: input_ids.shape[1]]
        bias = ((1.0 - mask) * NEG)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        x = self.ln(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        emb = self.proj(pooled)
        return self.intent(emb), emb

    def aux_logits(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(emb) for k, head in self.aux.items()}


class Ranker(nn.Module):
    """query_embedding [B,E], intent_probs [B,C], item_features [B,N,F] -> scores [B,N].

    Explicit crosses: P(intent = item's leaf), and for brand/colour/material/size the query-side
    probability (from frozen attribute heads over the embedding) of the item's value, plus the
    probability that the query asks for none. Learned crosses: a query tower and an item tower
    multiplied elementwise (feature-cross MLP). Candidates are scored independently."""

    def __init__(self, emb_dim: int, num_intents: int, feat_dim: int, layout: dict[str, list[int]],
                 hidden: int, attr_heads: nn.ModuleDict):
        super().__init__()
        self.layout = {k: tuple(v) for k, v in layout.items()}
        self.attrs = [k for k in ("brand", "colour", "material", "size") if k in attr_heads]
        self.attr_heads = attr_heads
        for p in self.attr_heads.parameters():
            p.requires_grad_(False)
        n_explicit = 1 + 2 * len(self.attrs)
        self.q_tower = nn.Sequential(nn.Linear(emb_dim + num_intents, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.i_tower = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.Linear(hidden * 2 + 2 * n_explicit + 3, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))

    def forward(self, query_embedding: torch.Tensor, intent_probs: torch.Tensor, item_features: torch.Tensor):
        a, b = self.layout["leaf"]
        leaf_match = (item_features[..., a:b] * intent_probs[:, None, :]).sum(-1)      # [B,N]
        ones = torch.ones_like(leaf_match)
        explicit = [leaf_match]
        for k in self.attrs:
            a, b = self.layout[k]
            p = torch.softmax(self.attr_heads[k](query_embedding), dim=-1)            # [B, n+1]
            explicit.append((item_features[..., a:b] * p[:, None, : b - a]).sum(-1))
            explicit.append(p[:, b - a][:, None] * ones)
        ex = torch.stack(explicit, dim=-1)                                             # [B,N,K]
        tail = item_features[..., self.layout["log_price"][0]:]                        # [B,N,3]
        qh = self.q_tower(torch.cat([query_embedding, intent_probs], dim=-1))
        ih = self.i_tower(item_features)
        cross = qh[:, None, :] * ih
        x = torch.cat([cross, ih, ex, ex * leaf_match[..., None], tail], dim=-1)
        return self.head(x).squeeze(-1)
