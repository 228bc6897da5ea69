"""Item feature table: what the ranker sees of each catalog item (and what the ensemble's feature
lookup serves): one-hot leaf, brand, colour, material, size; standardized log-price; popularity
percentile inside the leaf; standardized log-popularity."""
from __future__ import annotations

import numpy as np

from .data import Catalog, _leaf_pop_rank

ATTRS = ("brand", "colour", "material", "size")


def feature_layout(cat: Catalog) -> dict[str, list[int]]:
    sizes = [("leaf", len(cat.leaves)), ("brand", len(cat.brands)), ("colour", len(cat.colours)),
             ("material", len(cat.materials)), ("size", len(cat.sizes)), ("log_price", 1),
             ("popularity_pct", 1), ("log_popularity", 1)]
    layout, start = {}, 0
    for name, n in sizes:
        layout[name] = [start, start + n]
        start += n
    return layout


def build_item_features(cat: Catalog) -> tuple[np.ndarray, dict[str, list[int]]]:
    layout = feature_layout(cat)
    m = len(cat)
    feat = np.zeros((m, layout["log_popularity"][1]), np.float32)
    rows = np.arange(m)
    for name, codes in (("leaf", cat.leaf), ("brand", cat.brand), ("colour", cat.colour),
                        ("material", cat.material), ("size", cat.size)):
        feat[rows, layout[name][0] + codes] = 1.0
    lp = np.log(cat.price.astype(np.float64))
    feat[:, layout["log_price"][0]] = (lp - lp.mean()) / (lp.std() + 1e-9)
    feat[:, layout["popularity_pct"][0]] = _leaf_pop_rank(cat)
    lpop = np.log1p(cat.popularity.astype(np.float64))
    feat[:, layout["log_popularity"][0]] = (lpop - lpop.mean()) / (lpop.std() + 1e-9)
    return feat, layout
