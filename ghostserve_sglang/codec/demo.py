"""A short tour of the codec on KV-shaped data: python -m ghostserve_sglang.codec.demo

Four tensor-parallel ranks each hold a bf16 KV slice; two parity shards protect them; two ranks lose
their slice and it is rebuilt byte for byte from the survivors and the parity.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import available_backends, new_code, select_backend


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=4, help="data shards (TP ranks)")
    parser.add_argument("--parity", type=int, default=2, help="parity shards")
    parser.add_argument("--tokens", type=int, default=4096, help="KV slots per rank")
    args = parser.parse_args(argv)

    code = new_code("rs", args.ranks, args.parity)
    heads, head_dim, layers = 3, 16, 2
    kv = [torch.randn(layers, 2, args.tokens, heads, head_dim).to(torch.bfloat16) for _ in range(args.ranks)]
    nbytes = kv[0].numel() * kv[0].element_size()
    print(f"code {code}: {args.ranks} ranks x {nbytes / 2**20:.2f} MiB of bf16 KV, "
          f"backend {select_backend('cpu').name} (available: {', '.join(available_backends('cpu'))})")

    start = time.perf_counter()
    parity = code.encode(kv)
    encoded = time.perf_counter() - start
    print(f"encode: {args.parity} parity shards, {args.parity * nbytes / 2**20:.2f} MiB on the host "
          f"({args.parity / args.ranks:.0%} of a replica), {encoded * 1e3:.2f} ms")

    lost = list(range(min(args.parity, args.ranks)))
    shards = [None if i in lost else s for i, s in enumerate(kv + parity)]
    start = time.perf_counter()
    rebuilt = code.reconstruct(shards)
    rebuilt_s = time.perf_counter() - start
    same = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(rebuilt, kv))
    print(f"lost ranks {lost}; rebuilt in {rebuilt_s * 1e3:.2f} ms; bit-exact: {same}")
    if not same:
        raise SystemExit("rebuild differs from the original KV")


if __name__ == "__main__":
    main()
