"""Seeded generator of a synthetic e-commerce catalog and query log, written to files.

Same seed and profile -> byte-identical files (the npz writer fixes zip timestamps).

Catalog: items in a 3-level category hierarchy (leaf = "group/sub/leaf"), with brand, colour,
material, size, price, popularity and a title built from those words.
Queries: built from a leaf's noun (or a synonym), and optionally brand/colour/material/size words
of a target item, with typos, word-order noise and filler words. Each query is labelled with its
intent (leaf index) and graded relevance (0-4) for 20-100 candidates:
  0  candidate in another leaf
  1+ same leaf, +1 per requested attribute (brand, colour, material, size) it matches (max 4)
  for a query that requests no attribute: 1, or 2 for the leaf's most popular items (top 20%).
Popularity alone therefore does not rank well; matching category and attributes does.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig, Profile
from .errors import DataError, ExportError

# group -> sub -> leaf -> nouns (first is canonical, the rest are synonyms)
CATEGORY_TREE: dict[str, dict[str, dict[str, list[str]]]] = {
    "electronics": {
        "audio": {"headphones": ["headphones", "earphones", "headset"], "speakers": ["speaker", "soundbar"]},
        "computers": {"laptops": ["laptop", "ultrabook"], "monitors": ["monitor", "display", "screen"],
                      "keyboards": ["keyboard", "keypad"]},
        "phones": {"smartphones": ["smartphone", "phone", "mobile"], "cases": ["case", "cover"]},
        "cameras": {"cameras": ["camera", "camcorder"]},
    },
    "clothing": {
        "tops": {"shirts": ["shirt", "tshirt", "tee"], "sweaters": ["sweater", "jumper", "pullover"]},
        "dresses": {"dresses": ["dress", "gown"]},
        "shoes": {"sneakers": ["sneakers", "trainers"], "boots": ["boots", "booties"]},
        "outerwear": {"jackets": ["jacket", "coat", "parka"]},
        "accessories": {"hats": ["hat", "cap", "beanie"], "scarves": ["scarf", "shawl"]},
    },
    "home": {
        "kitchen": {"cookware": ["skillet", "pan", "wok"], "knives": ["knife", "cleaver"],
                    "mugs": ["mug", "cup", "tumbler"]},
        "furniture": {"chairs": ["chair", "stool"], "tables": ["table", "desk"]},
        "decor": {"lamps": ["lamp", "lantern"]},
        "bedding": {"pillows": ["pillow", "cushion"], "blankets": ["blanket", "throw", "quilt"]},
    },
    "sports": {
        "fitness": {"yoga_mats": ["yogamat", "mat"], "dumbbells": ["dumbbell", "kettlebell"]},
        "cycling": {"bikes": ["bike", "bicycle"], "helmets": ["helmet"]},
        "outdoor": {"tents": ["tent", "shelter"], "backpacks": ["backpack", "rucksack", "daypack"]},
    },
    "toys": {
        "building": {"blocks": ["blocks", "bricks"]},
        "dolls": {"dolls": ["doll", "figure"]},
        "games": {"puzzles": ["puzzle", "jigsaw"]},
    },
    "beauty": {
        "skincare": {"creams": ["cream", "moisturizer", "lotion"]},
        "haircare": {"shampoo": ["shampoo", "conditioner"]},
        "fragrance": {"perfume": ["perfume", "cologne", "fragrance"]},
    },
    "office": {
        "stationery": {"pens": ["pen", "ballpoint"], "journals": ["journal", "notepad", "diary"]},
    },
    "garden": {
        "tools": {"shovels": ["shovel", "spade"]},
        "plants": {"planters": ["planter", "flowerpot"]},
        "watering": {"hoses": ["hose", "sprinkler"]},
    },
}

# canonical value -> synonyms used in queries
COLOURS = {"black": ["black"], "white": ["white"], "grey": ["grey", "gray"], "red": ["red"],
           "blue": ["blue"], "navy": ["navy", "darkblue"], "green": ["green"], "yellow": ["yellow"],
           "pink": ["pink", "rose"], "brown": ["brown", "tan"], "beige": ["beige", "cream"],
           "purple": ["purple", "violet"]}
MATERIALS = {"cotton": ["cotton"], "wool": ["wool", "woolen"], "leather": ["leather"],
             "steel": ["steel", "stainless"], "aluminium": ["aluminium", "aluminum"],
             "plastic": ["plastic"], "wood": ["wood", "wooden"], "glass": ["glass"],
             "ceramic": ["ceramic", "porcelain"], "bamboo": ["bamboo"]}
SIZES = {"small": ["small", "s"], "medium": ["medium", "m"], "large": ["large", "l"],
         "xl": ["xl", "extralarge"], "mini": ["mini", "tiny"], "compact": ["compact"]}
FILLERS = ["cheap", "best", "new", "sale", "buy", "for", "men", "women", "kids", "gift", "online", "deal"]
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "ne", "pix", "sol", "tor", "ven", "qua",
              "dor", "el", "fi", "gan", "hul", "ix", "jun", "kel", "mar", "nor", "ost", "pra", "rin"]

DATA_FILES = ("catalog.npz", "queries_train.json", "queries_heldout.json")
MANIFEST = "manifest.json"


@dataclass
class Catalog:
    item_ids: np.ndarray      # int64 [M], not 0..M-1
    leaf: np.ndarray          # int64 [M]
    brand: np.ndarray         # int64 [M]
    colour: np.ndarray        # int64 [M]
    material: np.ndarray      # int64 [M]
    size: np.ndarray          # int64 [M]
    price: np.ndarray         # float32 [M]
    popularity: np.ndarray    # float32 [M] (expected weekly sales, heavy-tailed)
    titles: list[str]
    leaves: list[str]
    brands: list[str]
    colours: list[str]
    materials: list[str]
    sizes: list[str]

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass
class Dataset:
    catalog: Catalog
    train: list[dict]         # {"query", "intent", "spec": {brand,colour,material,size: idx|-1}, "candidates": [row...], "relevance": [...]}
    heldout: list[dict]
    seed: int
    profile: str


def leaf_names() -> list[str]:
    return [f"{g}/{s}/{leaf}" for g, subs in CATEGORY_TREE.items() for s, leaves in subs.items() for leaf in leaves]


def leaf_nouns() -> list[list[str]]:
    return [nouns for subs in CATEGORY_TREE.values() for leaves in subs.values() for nouns in leaves.values()]


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), k))
        if name not in names:
            names.append(name)
    return names


def _typo(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(0, len(word) - 1))
    kind = int(rng.integers(0, 4))
    if kind == 0:   # swap adjacent
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:   # drop
        return word[:i] + word[i + 1:]
    if kind == 2:   # double
        return word[:i] + word[i] + word[i:]
    return word[:i] + "abcdefghijklmnopqrstuvwxyz"[int(rng.integers(0, 26))] + word[i + 1:]


def generate_catalog(cfg: DataConfig, rng: np.random.Generator) -> Catalog:
    leaves, nouns = leaf_names(), leaf_nouns()
    groups = [name.split("/")[0] for name in leaves]
    group_names = list(CATEGORY_TREE)
    brands = _brand_names(rng, cfg.n_brands)
    # each group sells ~12 brands; brands may span groups
    group_brands = {g: np.sort(rng.choice(cfg.n_brands, size=min(12, cfg.n_brands), replace=False))
                    for g in group_names}
    colours, materials, sizes = list(COLOURS), list(MATERIALS), list(SIZES)
    # each group uses a subset of materials
    group_materials = {g: np.sort(rng.choice(len(materials), size=5, replace=False)) for g in group_names}
    m, n_leaf = cfg.n_items, len(leaves)
    leaf_weight = rng.uniform(0.5, 1.5, n_leaf)
    leaf = rng.choice(n_leaf, size=m, p=leaf_weight / leaf_weight.sum())
    brand = np.empty(m, np.int64)
    material = np.empty(m, np.int64)
    for i in range(m):
        g = groups[leaf[i]]
        gb = group_brands[g]
        # brands within a group are not equally common
        w = 1.0 / np.arange(1, len(gb) + 1) ** 0.7
        brand[i] = gb[rng.choice(len(gb), p=w / w.sum())]
        material[i] = group_materials[g][int(rng.integers(0, 5))]
    colour = rng.integers(0, len(colours), m)
    size = rng.integers(0, len(sizes), m)
    leaf_price = np.exp(rng.uniform(np.log(5), np.log(800), n_leaf))
    price = (leaf_price[leaf] * np.exp(rng.normal(0, 0.35, m))).astype(np.float32)
    popularity = (rng.pareto(1.5, m) * 10 + 1).astype(np.float32)
    item_ids = np.sort(rng.choice(np.arange(100_000, 100_000 + 50 * m), size=m, replace=False)).astype(np.int64)
    titles = [f"{brands[brand[i]]} {colours[colour[i]]} {materials[material[i]]} {nouns[leaf[i]][0]} {sizes[size[i]]}"
              for i in range(m)]
    return Catalog(item_ids, leaf.astype(np.int64), brand, colour.astype(np.int64), material,
                   size.astype(np.int64), price, popularity, titles, leaves, brands, colours, materials, sizes)


def _leaf_pop_rank(cat: Catalog) -> np.ndarray:
    """Per item: its popularity percentile inside its leaf (0..1)."""
    pct = np.zeros(len(cat), np.float32)
    for lf in np.unique(cat.leaf):
        idx = np.flatnonzero(cat.leaf == lf)
        order = np.argsort(cat.popularity[idx], kind="stable")
        pct[idx[order]] = (np.arange(len(idx)) + 0.5) / len(idx)
    return pct


def relevance(cat: Catalog, leaf_pct: np.ndarray, intent: int, spec: dict, rows: np.ndarray) -> np.ndarray:
    same = cat.leaf[rows] == intent
    matched = np.zeros(len(rows), np.int64)
    n_req = 0
    for key, arr in (("brand", cat.brand), ("colour", cat.colour), ("material", cat.material), ("size", cat.size)):
        if spec[key] >= 0:
            n_req += 1
            matched += arr[rows] == spec[key]
    if n_req == 0:
        grade = 1 + (leaf_pct[rows] >= 0.8)
    else:
        grade = np.minimum(4, 1 + matched)
    return np.where(same, grade, 0).astype(np.int64)


def generate_queries(cfg: DataConfig, cat: Catalog, n: int, rng: np.random.Generator,
                     leaf_pct: np.ndarray) -> list[dict]:
    nouns = leaf_nouns()
    by_leaf = [np.flatnonzero(cat.leaf == lf) for lf in range(len(cat.leaves))]
    group_of = np.array([list(CATEGORY_TREE).index(name.split("/")[0]) for name in cat.leaves])
    by_group = [np.flatnonzero(group_of[cat.leaf] == g) for g in range(len(CATEGORY_TREE))]
    syn = {"colour": (cat.colours, COLOURS), "material": (cat.materials, MATERIALS), "size": (cat.sizes, SIZES)}
    out: list[dict] = []
    for _ in range(n):
        target = int(rng.integers(0, len(cat)))
        intent = int(cat.leaf[target])
        spec = {"brand": -1, "colour": -1, "material": -1, "size": -1}
        noun_list = nouns[intent]
        words = [noun_list[0] if rng.random() > cfg.synonym_prob else noun_list[int(rng.integers(0, len(noun_list)))]]
        if rng.random() < 0.45:
            spec["brand"] = int(cat.brand[target])
            words.insert(0, cat.brands[spec["brand"]])
        for key, p in (("colour", 0.45), ("material", 0.3), ("size", 0.25)):
            if rng.random() < p:
                val = int(getattr(cat, key)[target])
                spec[key] = val
                names, table = syn[key]
                choices = table[names[val]]
                w = choices[0] if rng.random() > cfg.synonym_prob else choices[int(rng.integers(0, len(choices)))]
                words.insert(int(rng.integers(0, len(words) + 1)) if key == "size" else 0, w)
        if rng.random() < cfg.filler_prob:
            words.insert(int(rng.integers(0, len(words) + 1)), FILLERS[int(rng.integers(0, len(FILLERS)))])
        if rng.random() < cfg.shuffle_prob:
            words = [words[int(i)] for i in rng.permutation(len(words))]
        words = [_typo(w, rng) if len(w) >= 4 and rng.random() < cfg.typo_prob else w for w in words]
        if rng.random() < 0.1:
            words = [w.capitalize() if rng.random() < 0.5 else w.upper() for w in words]
        # candidates: same leaf (some matching the spec), same group, random
        k = int(rng.integers(cfg.min_candidates, cfg.max_candidates + 1))
        n_leaf = max(2, int(k * rng.uniform(0.3, 0.5)))
        n_group = int(k * rng.uniform(0.1, 0.25))
        pool = by_leaf[intent]
        cands = [target]
        cands += list(rng.choice(pool, size=min(n_leaf, len(pool)), replace=False))
        if spec["brand"] >= 0:
            bp = pool[cat.brand[pool] == spec["brand"]]
            cands += list(rng.choice(bp, size=min(len(bp), max(1, n_leaf // 3)), replace=False))
        gp = by_group[group_of[intent]]
        cands += list(rng.choice(gp, size=n_group, replace=False))
        cands += list(rng.integers(0, len(cat), size=k))
        uniq = list(dict.fromkeys(int(c) for c in cands))[:k]
        rows = np.array(uniq, np.int64)[rng.permutation(min(k, len(uniq)))]
        rel = relevance(cat, leaf_pct, intent, spec, rows)
        out.append({"query": " ".join(words), "intent": intent, "spec": spec,
                    "candidates": rows.tolist(), "relevance": rel.tolist()})
    return out


def generate(profile: Profile, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    cat = generate_catalog(profile.data, rng)
    pct = _leaf_pop_rank(cat)
    train = generate_queries(profile.data, cat, profile.data.n_train_queries, rng, pct)
    heldout = generate_queries(profile.data, cat, profile.data.n_heldout_queries, rng, pct)
    return Dataset(cat, train, heldout, seed, profile.name)


# ---------------------------------------------------------------------------------------- files

def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez without the wall-clock zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path, error: type[ExportError], missing: str) -> tuple[dict, dict]:
    """(the JSON manifest at path, its "files" record); error(missing) when there is no such file,
    error naming the file when it is not JSON or has no "files"."""
    if not path.is_file():
        raise error(missing)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return manifest, manifest["files"]
    except (ValueError, KeyError) as e:
        raise error(f"{path} is corrupt: {e}") from None


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")


def write_dataset(ds: Dataset, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = ds.catalog
    write_npz(out_dir / "catalog.npz", item_ids=c.item_ids, leaf=c.leaf, brand=c.brand, colour=c.colour,
              material=c.material, size=c.size, price=c.price, popularity=c.popularity,
              titles=np.array(c.titles, dtype=np.str_))
    _dump_json(out_dir / "queries_train.json", ds.train)
    _dump_json(out_dir / "queries_heldout.json", ds.heldout)
    manifest = {"seed": ds.seed, "profile": ds.profile, "leaves": c.leaves, "brands": c.brands,
                "colours": c.colours, "materials": c.materials, "sizes": c.sizes,
                "files": {name: sha256_file(out_dir / name) for name in DATA_FILES}}
    _dump_json(out_dir / MANIFEST, manifest)
    return out_dir


def load_dataset(data_dir: Path) -> Dataset:
    """Load and verify a data directory; any problem is a DataError naming the file."""
    data_dir = Path(data_dir)
    manifest, files = read_manifest(data_dir / MANIFEST, DataError,
                                    f"data directory {data_dir} has no {MANIFEST} (missing or not generated)")
    for name in DATA_FILES:
        p = data_dir / name
        if not p.is_file():
            raise DataError(f"data file {p} is missing")
        if sha256_file(p) != files.get(name):
            raise DataError(f"data file {p} is corrupt (sha256 does not match {MANIFEST}); "
                            f"delete {data_dir} to regenerate it")
    try:
        with np.load(data_dir / "catalog.npz", allow_pickle=False) as z:
            cat = Catalog(z["item_ids"], z["leaf"], z["brand"], z["colour"], z["material"], z["size"],
                          z["price"], z["popularity"], [str(t) for t in z["titles"]], manifest["leaves"],
                          manifest["brands"], manifest["colours"], manifest["materials"], manifest["sizes"])
        train = json.loads((data_dir / "queries_train.json").read_text(encoding="utf-8"))
        heldout = json.loads((data_dir / "queries_heldout.json").read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any parse problem is a data problem
        raise DataError(f"data in {data_dir} does not load: {type(e).__name__}: {e}") from None
    return Dataset(cat, train, heldout, int(manifest["seed"]), str(manifest["profile"]))


def ensure_dataset(profile: Profile, seed: int, data_root: Path) -> tuple[Dataset, Path]:
    """Generate the data for (profile, seed) under data_root unless present; verify it either way."""
    d = Path(data_root) / f"{profile.name}-seed{seed}"
    if not d.exists():

        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{d.name}-", dir=d.parent))
        try:
            write_dataset(generate(profile, seed), tmp)
            try:
                tmp.rename(d)
            except OSError:
                if not d.exists():   # lost a race with another process: use its (identical) files
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ds = load_dataset(d)
    if ds.seed != seed or ds.profile != profile.name:
        raise DataError(f"data in {d} was made for profile {ds.profile!r} seed {ds.seed}, "
                        f"not {profile.name!r} seed {seed}")
    return ds, d
