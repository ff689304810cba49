"""The UNet's long self-attention in each exact form: error against float32 and time.

    python benchmarks/attention_kernels.py            # CPU: einsum vs blockwise
    python benchmarks/attention_kernels.py --dtype bfloat16   # on a GPU box: adds cuDNN fused

Shapes: the SD1.5 UNet's self-attention at 512 px with the CFG pair (batch 2): 4096 tokens x
8 heads x 40 (level 0) and 1024 x 8 x 80 (level 1). Rows: `attend` (logits materialised),
`attend_blockwise` (online softmax, block 512), and `attend_long` (what the UNet runs on this
backend: blockwise on CPU, cuDNN flash attention through jax.nn.dot_product_attention on GPU in
half precision). Error: relative L2 against `attend` in float32 on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax.models.layers import attend, attend_blockwise, attend_long

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kernels = {
        "attend (materialised)": jax.jit(attend),
        "attend_blockwise (512)": jax.jit(lambda q, k, v: attend_blockwise(q, k, v, 512, 512)),
        f"attend_long ({jax.default_backend()})": jax.jit(lambda q, k, v: attend_long(q, k, v, 512)),
    }
    print(f"\n## Long self-attention kernels, {args.dtype}, {jax.devices()[0].device_kind}, median of "
          f"{args.repeats}\n")
    print("| shape (B, N, H, D) | kernel | time (ms) | rel L2 vs float32 attend |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in ((2, 4096, 8, 40), (2, 1024, 8, 80)):
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        reference = np.asarray(jax.jit(attend)(q, k, v), np.float64)
        inputs = [jnp.asarray(a, dtype) for a in (q, k, v)]
        for name, fn in kernels.items():
            out = np.asarray(fn(*inputs).astype(jnp.float32), np.float64)  # also the warm-up
            error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(*inputs).block_until_ready()
                times.append(time.perf_counter() - start)
            print(f"| {shape} | {name} | {1e3 * statistics.median(times):.3f} | {error:.2e} |")


if __name__ == "__main__":
    main()
