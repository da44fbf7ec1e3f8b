"""Modular-arithmetic data: all p² pairs `[x, op, y, =]`, a seeded split (background:
docs/theory.md, 'Modular-arithmetic forgetting').

Tokens `0..p-1` are the residues, `=` is `p`, `+` is `p+1`, `−` is `p+2` (vocabulary
`p+3`; for p = 113: 113, 114, 115 and 116 tokens, as in the paper). The answer is read at
the last position and is a residue, so the unembedding has `p` outputs.
"""

from __future__ import annotations

import numpy as np

from ._config import is_prime

OPS = ("+", "-")


def vocab_size(p: int) -> int:
    return p + 3


def eq_token(p: int) -> int:
    return p


def op_token(p: int, op: str) -> int:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; choose + or -")
    return p + 1 if op == "+" else p + 2


def all_pairs(p: int, op: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `(p², 4)` int32 in the order `x·p + y`, labels `(p²,)` = `(x op y) mod p`."""
    if not is_prime(p) or p < 5:
        raise ValueError(f"p must be a prime ≥ 5, got {p}")
    x, y = np.divmod(np.arange(p * p, dtype=np.int64), p)
    tok = np.stack(
        [x, np.full_like(x, op_token(p, op)), y, np.full_like(x, eq_token(p))], axis=1
    ).astype(np.int32)
    lab = ((x + y) % p if op == "+" else (x - y) % p).astype(np.int32)
    return tok, lab


def split_indices(p: int, train_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of the p² pair indices: `round(frac·p²)` for training.

    Depends only on `(p, train_frac, seed)` (NumPy PCG64), so addition and subtraction
    share it and every depth sees the same split for a given seed.
    """
    n = p * p
    perm = np.random.default_rng(np.random.SeedSequence([seed, p, 20240215])).permutation(n)
    k = round(train_frac * n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def make_split(p: int, op: str, train_frac: float, seed: int) -> dict[str, np.ndarray]:
    tok, lab = all_pairs(p, op)
    tr, te = split_indices(p, train_frac, seed)
    return {
        "x_train": tok[tr],
        "y_train": lab[tr],
        "x_test": tok[te],
        "y_test": lab[te],
        "x_all": tok,
        "y_all": lab,
    }
