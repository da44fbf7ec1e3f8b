"""Time one full-batch AdamW training step of the modular transformer:
jaxattn (Equinox + optax, jitted `lax.scan`) against the same model in PyTorch eager.

Usage: python benchmarks/modular_step.py [--p 113] [--d 128] [--depth 6] [--steps 10]
       [--repeat 3] [--threads 2]

Same model (token + positional embeddings, one weight-tied single-head attention block
Q, K, V, O without bias, 1/√d scores, unembedding), same data (60 % of the p² addition
pairs), same optimiser (AdamW lr 1e-3, betas (0.9, 0.98), weight decay 1.0), float32.
jaxattn's default one-head layer is computed from `A = QᵀK` and `W_OV = O V` (two token
matmuls per layer instead of four; the same function): the unfused time is printed too.
Compile time is excluded (first call); each timing is the best of `--repeat` runs of
`--steps` steps, `block_until_ready` for JAX. PyTorch is an optional benchmark
dependency: without it only the jaxattn time is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time


def time_jax(a, fused=True):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from jaxattn.modular import (
        ModularTransformer,
        make_config,
        make_split,
        trainable_filter,
    )
    from jaxattn.modular._train import adamw, chunk_fn

    c = make_config(p=a.p, d_model=a.d, depth=a.depth, train_frac=0.6, warmup=0, fused=fused)
    model = ModularTransformer(c, key=jax.random.key(0))
    sp = make_split(c.p, "+", c.train_frac, 0)
    x, y = jnp.asarray(sp["x_train"]), jnp.asarray(sp["y_train"])
    params, static = eqx.partition(model, trainable_filter(model, lora_only=False))
    opt = adamw(c.lr, c.beta1, c.beta2, c.weight_decay, 0, "float32")
    state = opt.init(params)
    res = {}
    for n in (1, a.steps) if fused else (a.steps,):
        out = chunk_fn(params, static, state, x, y, n, opt)
        jax.block_until_ready(out)
        best = math.inf
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            if n == 1:
                p, s = params, state
                for _ in range(a.steps):
                    p, s, _ = chunk_fn(p, static, s, x, y, 1, opt)
                jax.block_until_ready(p)
            else:
                jax.block_until_ready(chunk_fn(params, static, state, x, y, n, opt))
            best = min(best, (time.perf_counter() - t0) / a.steps)
        res["per_call" if n == 1 else "scan"] = best
    return res, x.shape[0]


def time_torch(a):
    import numpy as np
    import torch

    from jaxattn.modular import make_split

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p, d, depth = a.p, a.d, a.depth

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            s = 1 / math.sqrt(d)
            self.embed = torch.nn.Parameter(torch.randn(p + 3, d) * s)
            self.pos = torch.nn.Parameter(torch.randn(4, d) * s)
            self.Q, self.K, self.V, self.O = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
            self.unembed = torch.nn.Linear(d, p, bias=False)

        def forward(self, tok):
            x = self.embed[tok] + self.pos
            for _ in range(depth):
                q, k, v = self.Q(x), self.K(x), self.V(x)
                att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
                x = x + self.O(att @ v)
            return self.unembed(x[:, -1])

    sp = make_split(p, "+", 0.6, 0)
    x = torch.from_numpy(sp["x_train"].astype(np.int64))
    y = torch.from_numpy(sp["y_train"].astype(np.int64))
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()
    best = math.inf
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        best = min(best, (time.perf_counter() - t0) / a.steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    jx, n = time_jax(a)
    unfused, _ = time_jax(a, fused=False)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; p = {a.p}, "
        f"d = {a.d}, depth = {a.depth}, {n} training pairs, float32"
    )
    print(f"jaxattn  one step per call: {jx['per_call'] * 1e3:8.1f} ms/step")
    print(f"jaxattn  {a.steps} steps per scan: {jx['scan'] * 1e3:8.1f} ms/step")
    print(
        f"jaxattn  {a.steps} steps per scan, unfused (4 projections per layer): "
        f"{unfused['scan'] * 1e3:8.1f} ms/step"
    )
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch not installed: peer skipped (pip install torch to compare)")
        return
    tt = time_torch(a)
    print(f"PyTorch eager ({a.threads} threads): {tt * 1e3:8.1f} ms/step")
    print(
        f"ratio PyTorch / jaxattn: {tt / jx['per_call']:.2f}× (one step per call), "
        f"{tt / jx['scan']:.2f}× (scan)"
    )


if __name__ == "__main__":
    main()
