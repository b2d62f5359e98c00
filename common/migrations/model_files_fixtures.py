"""Model-file trees for tests, the demo and the benchmark: real joblib files, generated reproducibly.

`build_tree` writes small real models (scikit-learn estimators, numpy arrays, dicts) across names,
events and types, some joblib-compressed and some plain pickles, and returns each file's object so a
test can compare what `load_model` returns. `build_sized_tree` writes files of chosen sizes (a dict
holding random bytes, incompressible) for the benchmark. Both need numpy and scikit-learn (the `dev`
extra); nothing here is imported by the migration itself.
"""

from __future__ import annotations

import math
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = ("signup", "purchase", "churn", "renewal")
MODEL_TYPES = ("classifier_binary", "regression", "vectorizer")


@dataclass
class Tree:
    """What was written: path → the object in it, and the files per name."""

    root: Path
    objects: dict[str, Any] = field(default_factory=dict)  # absolute path → object
    names: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return len(self.objects)


def file_name(name: str, event: str, model_type: str, ext: str = "joblib") -> str:
    """The default naming pattern, `{name}__{event}__{model_type}.{ext}`."""
    return f"{name}__{event}__{model_type}.{ext}"


def make_model(model_type: str, rng: random.Random) -> Any:
    """A small real model of that type: a fitted estimator, or the arrays and dicts teams also save."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    seed = rng.randrange(2**31)
    data = np.random.default_rng(seed)
    x = data.normal(size=(60, 4))
    kind = rng.randrange(3)
    if model_type == "classifier_binary":
        y = (x[:, 0] + data.normal(scale=0.5, size=60) > 0).astype(int)
        model = LogisticRegression() if kind else DecisionTreeClassifier(max_depth=3, random_state=seed)
        return model.fit(x, y)
    if model_type == "regression":
        if kind == 0:
            return {"coef": data.normal(size=4), "intercept": float(data.normal()), "features": ["a", "b", "c", "d"]}
        return Ridge(alpha=rng.choice([0.1, 1.0, 10.0])).fit(x, x @ data.normal(size=4))
    if kind == 0:
        return data.normal(size=(rng.randrange(5, 50), 8))
    if kind == 1:
        return {"vocabulary": {f"token{i}": i for i in range(rng.randrange(10, 200))}, "lowercase": True}
    return StandardScaler().fit(x)


def dump(obj: Any, path: Path, how: str) -> None:
    """`joblib` (plain), `joblib-zlib` (compress=3) or `pickle` (protocol 5, written as .pkl)."""
    import joblib

    if how == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=5))
    else:
        joblib.dump(obj, path, compress=3 if how == "joblib-zlib" else 0)


def build_tree(root: Path, names: int = 30, events: tuple[str, ...] = EVENTS,
               model_types: tuple[str, ...] = MODEL_TYPES, seed: int = 14, prefix: str = "model") -> Tree:
    """names × events × model_types files under `root`, spread over a few subdirectories."""
    rng = random.Random(seed)
    tree = Tree(root)
    for i in range(names):
        name = f"{prefix}_{i:03d}"
        tree.names.append(name)
        folder = root / ("team_a" if i % 3 == 0 else "team_b" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for event in events:
            for model_type in model_types:
                how = rng.choice(("joblib", "joblib", "joblib-zlib", "pickle"))
                path = folder / file_name(name, event, model_type, "pkl" if how == "pickle" else "joblib")
                obj = make_model(model_type, rng)
                dump(obj, path, how)
                tree.objects[str(path)] = obj
    return tree


def build_sized_tree(root: Path, files: int, min_bytes: int, max_bytes: int, names: int, seed: int = 14,
                     log_uniform: bool = False) -> list[int]:
    """`files` joblib files of random sizes in [min_bytes, max_bytes] over `names` names; returns the sizes.

    Each holds a dict with a random uint8 array, so the sizes are what the disk and the database carry.
    """
    import joblib
    import numpy as np

    rng = random.Random(seed)
    data = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sizes = []
    per_name = math.ceil(files / names)
    for i in range(files):
        name, slot = f"bench_{i // per_name:04d}", i % per_name
        size = int(math.exp(rng.uniform(math.log(min_bytes), math.log(max_bytes)))) if log_uniform \
            else rng.randint(min_bytes, max_bytes)
        obj = {"weights": data.integers(0, 256, size=max(1, size - 200), dtype=np.uint8), "slot": slot}
        path = root / file_name(name, f"event{slot // len(MODEL_TYPES):03d}", MODEL_TYPES[slot % len(MODEL_TYPES)])
        joblib.dump(obj, path)
        sizes.append(os.path.getsize(path))
    return sizes


def same_model(a: Any, b: Any) -> bool:
    """Equality for what `make_model` builds: arrays element-wise, estimators by their fitted state."""
    import numpy as np

    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_model(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_model(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return same_model(vars(a), vars(b))
    state = getattr(a, "__getstate__", lambda: None)()  # e.g. a fitted tree's nodes (a compiled type)
    if isinstance(state, dict):
        return same_model(state, b.__getstate__())
    return bool(a == b)
