"""Constrained beam search over a semantic-ID trie: the search's own cost per user.

    python benchmarks/bench_beam_search.py --codes SEMANTIC_DIR/codes.parquet
        [--batch 64] [--beam 20] [--top-k 10] [--reps 5]

Reads codes written by `genrec tokenize`, builds the CodeTrie, and times `beam_search` with
seeded random logits standing in for a decoder (one warm-up call first, one thread). Prints
ONE JSON line: trie size and build time, ms per batch and per user, and the number of
results that are not catalog items (must be 0). A decoder's own steps come on top.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genrec.semantic.beam import CodeTrie, beam_search
from genrec.semantic.tokenize import read_codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codes", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ids, codes = read_codes(args.codes)
    t0 = time.perf_counter()
    trie = CodeTrie(codes, ids)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)

    def step(prefix: torch.Tensor) -> torch.Tensor:
        return torch.randn(prefix.shape[0], trie.vocab, generator=gen)

    beam_search(step, trie, args.batch, args.beam, args.top_k)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.reps):
        items, _ = beam_search(step, trie, args.batch, args.beam, args.top_k)
    dt = (time.perf_counter() - t0) / args.reps
    valid = set(ids.tolist())
    invalid = sum(i not in valid for i in items.flatten().tolist())
    print(
        json.dumps(
            {
                "items": len(ids),
                "levels": int(codes.shape[1]),
                "vocab": trie.vocab,
                "nodes": trie.num_nodes,
                "trie_build_s": round(build_s, 3),
                "batch": args.batch,
                "beam": args.beam,
                "top_k": args.top_k,
                "ms_per_batch": round(dt * 1e3, 2),
                "ms_per_user": round(dt * 1e3 / args.batch, 3),
                "invalid": invalid,
            }
        )
    )


if __name__ == "__main__":
    main()
