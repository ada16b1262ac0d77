"""T-ECD (T-Bank cross-domain e-commerce): events of three item domains plus payments.

Layout:
    {marketplace,retail,offers}/events/{day:05d}.pq   timestamp, user_id, item_id, subdomain,
                                                       action_type, os
    payments/events/{day:05d}.pq                       timestamp, user_id, brand_id, price
    {domain}/items.pq, users.pq, brands.pq             catalogs (not events)

Item ids of the domains overlap, so they are namespaced: item_id = DOMAIN << 56 | raw id
with DOMAINS below (payments are events on brands: their "item" is the brand id in domain 3).
Integer timestamps are read as seconds; Arrow timestamp columns are converted to seconds.
Context: `domain` (the index below) and `surface` (a stable 15-bit CRC32 of `subdomain`).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrec.data_pipeline.sources.base import FileKind, ParquetSource

DOMAINS = ("marketplace", "retail", "offers", "payments")
ACTION_TYPES = {
    "view": "view",
    "click": "click",
    "add-to-cart": "cart",
    "order": "order",
    "transaction": "order",
}
EVENT_TYPES = {
    "timestamp": "time",
    "user_id": "int",
    "item_id": "int",
    "subdomain": "str",
    "action_type": "str",
}
PAYMENT_TYPES = {"timestamp": "time", "user_id": "int", "brand_id": "int", "price": "float"}


def surface_code(value: str | None) -> int:
    """Stable small id of a subdomain string (same in every process and run)."""
    return zlib.crc32(value.encode()) & 0x7FFF if value else 0


def subdomain_surface(raw: pa.RecordBatch) -> np.ndarray:
    enc = pc.dictionary_encode(raw.column("subdomain"))
    lut = np.array([surface_code(v) for v in enc.dictionary.to_pylist()] + [0], np.int32)
    return lut[pc.fill_null(enc.indices, len(lut) - 1).to_numpy(zero_copy_only=False)]


def _event_kind(domain: str) -> FileKind:
    return FileKind(
        glob=f"{domain}/events/*.pq",
        types=EVENT_TYPES,
        user="user_id",
        item="item_id",
        time="timestamp",
        action="action_type",
        actions=ACTION_TYPES,
        context={"domain": DOMAINS.index(domain), "surface": subdomain_surface},
        domain=DOMAINS.index(domain),
    )


TECD = ParquetSource(
    name="tecd",
    kinds=[_event_kind(d) for d in DOMAINS[:3]]
    + [
        FileKind(
            glob="payments/events/*.pq",
            types=PAYMENT_TYPES,
            user="user_id",
            item="brand_id",
            time="timestamp",
            constant_action="order",
            context={"domain": DOMAINS.index("payments"), "surface": 0},
            domain=DOMAINS.index("payments"),
        )
    ],
    context=("domain", "surface"),
    namespaced=True,
)
