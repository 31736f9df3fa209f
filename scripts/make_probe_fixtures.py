"""Writes the linear-probe fixture (tests/fixtures/probe/): features of three splits drawn from
overlapping Gaussian classes (so every strength has a unique optimum), in flava-rs's feature
cache layout (safetensors: `features` [n, d] f32, `labels` [n] i64), and what scikit-learn's
LogisticRegression (lbfgs, multinomial) measures on them: the validation accuracy at every
strength of flava-rs's sweep (coarse grid 1e-6..1e6 every two decades, then a decade, then half a
decade either side of the best; C = 1 / strength), the strength chosen, and the test metrics of
the refit on train + val. Run with the venv of scripts/setup_python.sh."""

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "probe"
CLASSES, DIM = 8, 16
SIZES = {"train": 1600, "val": 800, "test": 1600}
COARSE = [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]


def split(rng, means, n):
    labels = rng.integers(0, CLASSES, size=n)
    x = means[labels] + rng.normal(0.0, 1.3, size=(n, DIM))
    return x.astype(np.float32), labels.astype(np.int64)


def fit(x, y, strength):
    m = LogisticRegression(C=1.0 / strength, max_iter=5000, tol=1e-10)
    return m.fit(x.astype(np.float64), y)


def accuracy(m, x, y):
    return float((m.predict(x.astype(np.float64)) == y).mean())


def main():
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 1.0, size=(CLASSES, DIM))
    data = {name: split(rng, means, n) for name, n in SIZES.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in data.items():
        save_file({"features": x, "labels": y}, str(OUT / f"{name}.safetensors"), metadata={"fingerprint": "sklearn-fixture"})
    (xt, yt), (xv, yv), (xs, ys) = data["train"], data["val"], data["test"]

    tried, best = [], (None, -1.0)

    def try_one(s):
        nonlocal best
        if any(abs(t / s - 1.0) < 1e-9 for t, _ in tried):
            return
        acc = accuracy(fit(xt, yt, s), xv, yv)
        tried.append((s, acc))
        if acc > best[1]:
            best = (s, acc)

    for s in COARSE:
        try_one(s)
    for step in (1.0, 0.5):
        centre = best[0]
        for s in (centre * 10 ** -step, centre * 10 ** step):
            try_one(s)
    refit = fit(np.concatenate([xt, xv]), np.concatenate([yt, yv]), best[0])
    proba = refit.predict_proba(xs.astype(np.float64))
    pred = proba.argmax(1)
    top5 = float(np.mean([ys[i] in np.argsort(-proba[i])[:5] for i in range(len(ys))]))
    recall = float(np.mean([(pred[ys == c] == c).mean() for c in range(CLASSES)]))
    result = {
        "classes": CLASSES,
        "tried": tried,
        "strength": best[0],
        "val_accuracy": best[1],
        "test": {"accuracy": float((pred == ys).mean()), "top5": top5, "mean_per_class_recall": recall},
    }
    (OUT / "sklearn.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
