"""Deterministic, versioned hashing of raw int64 ids into table rows.

Training, export and serving must map a raw id to the same row forever, so the hash is
our own (not Python's salted `hash`) and carries a version: a model trained with
HASH_VERSION 1 is served with version 1. The function is a splitmix64 finalizer,

    z = x + (seed + 1) * 0x9E3779B97F4A7C15          (mod 2^64)
    z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >>> 27)) * 0x94D049BB133111EB
    z =  z ^ (z >>> 31)
    row = (z & (2^63 - 1)) mod num_buckets

computed twice: in torch int64 arithmetic (two's-complement wraparound, logical shifts done
as arithmetic shift + mask) for the model, and in numpy uint64 for data and serving code.
A test pins that both agree bit for bit.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

HASH_VERSION = 1

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_LOW63 = (1 << 63) - 1


def _signed(u: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 math)."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= 1 << 63 else u


def check_hash_version(version: int) -> None:
    """Fail early when a config or artifact asks for a hash this code does not compute."""
    if version != HASH_VERSION:
        raise ValueError(
            f"embeddings.hash_version={version} but this genrec computes hash version "
            f"{HASH_VERSION}; retrain, or serve with the genrec release that trained the model"
        )


def feature_seed(feature: str, k: int = 0, version: int = HASH_VERSION) -> int:
    """Seed of hash function `k` of `feature`: stable across processes and releases."""
    check_hash_version(version)
    return zlib.crc32(f"genrec/v{version}/{feature}/{k}".encode())


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_ids(ids: torch.Tensor, seed: int, num_buckets: int) -> torch.Tensor:
    """Rows in [0, num_buckets) of raw int64 `ids` (any shape, any device), vectorized."""
    if num_buckets <= 0:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    z = ids.to(torch.int64) + _signed((seed + 1) * _GAMMA)
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    z = z ^ _srl(z, 31)
    return (z & _LOW63) % num_buckets


def hash_ids_np(ids: np.ndarray, seed: int, num_buckets: int) -> np.ndarray:
    """The numpy twin of `hash_ids` (same bits), for data and serving code without torch."""
    if num_buckets <= 0:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    u = np.asarray(ids).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = u + np.uint64(((seed + 1) * _GAMMA) & ((1 << 64) - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    return ((z & np.uint64(_LOW63)) % np.uint64(num_buckets)).astype(np.int64)


def collision_report(vocab_size: int, num_buckets: int, num_hashes: int = 1, seed: int = 0) -> dict:
    """Expected and measured collision rates of hashing ids 0..vocab_size-1.

    An id "collides" when another id gets the same row (k=1) or the same ordered tuple of
    k rows (k>1: the summed embedding is then identical). With uniform hashing into
    m = num_buckets**k cells, each of the other V-1 ids misses an id's cell with
    probability (1 - 1/m), so (birthday bound)

        expected colliding fraction = 1 - (1 - 1/m)^(V-1)
        expected occupied rows      = n * (1 - (1 - 1/n)^V)          (per hash function)
    """
    ids = torch.arange(vocab_size, dtype=torch.int64)
    rows = [hash_ids(ids, seed + j, num_buckets) for j in range(num_hashes)]
    if num_hashes == 1:
        key = rows[0]
    else:
        # rank-encode the k-tuple without overflow: unique over stacked rows
        key = torch.unique(torch.stack(rows, dim=1), dim=0, return_inverse=True)[1]
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    colliding = int((counts[inverse] > 1).sum())
    cells = float(num_buckets) ** num_hashes
    expected = -math.expm1((vocab_size - 1) * math.log1p(-1.0 / cells)) if cells > 1 else 1.0
    n = num_buckets
    occupied_expected = n * -math.expm1(vocab_size * math.log1p(-1.0 / n)) if n > 1 else 1.0
    return {
        "vocab_size": vocab_size,
        "num_buckets": num_buckets,
        "num_hashes": num_hashes,
        "hash_version": HASH_VERSION,
        "formula": "1 - (1 - 1/num_buckets**num_hashes)**(vocab_size - 1)",
        "expected_collision_rate": expected,
        "measured_collision_rate": colliding / max(vocab_size, 1),
        "expected_occupied_rows": occupied_expected,
        "measured_occupied_rows": int(torch.unique(rows[0]).numel()),
    }
