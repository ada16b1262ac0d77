"""Synthetic T-ECD: three item domains plus payments, in T-ECD's own layout and schema.

Funnel: every interaction is a `view`; it leads to a `click` (more often for items of the
user's clusters), an `add-to-cart` and an `order` (`transaction` in offers) a few seconds
later, and each order to a payment of the item's brand and price. Item ids restart at 0 in
every domain (so namespacing is needed). Timestamps are Arrow timestamp[ms] from START.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from genrec.data_pipeline.synthetic.world import EMBED_DIM, SliceEvents, World
from genrec.data_pipeline.synthetic.writers import ParquetSink, list_array, write_table

DAYS = 14
START = 1_735_689_600  # 2025-01-01 00:00:00 UTC
DOMAINS = ("marketplace", "retail", "offers")
DOMAIN_P = (0.6, 0.25, 0.15)
SUBDOMAINS = ("catalog", "search", "recommendations", "main_page")
SUBDOMAIN_P = (0.4, 0.25, 0.25, 0.1)
OS_NAMES = ("android", "ios", "web")
P_CLICK, P_CLICK_AFFINITY, P_CART, P_ORDER = 0.08, 0.12, 0.3, 0.4

EVENTS = pa.schema(
    [
        ("timestamp", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("subdomain", pa.string()),
        ("action_type", pa.string()),
        ("os", pa.string()),
    ]
)
PAYMENTS = pa.schema(
    [
        ("timestamp", pa.timestamp("ms")),
        ("user_id", pa.int64()),
        ("brand_id", pa.int64()),
        ("price", pa.float32()),
    ]
)


class TecdWriter:
    seconds = DAYS * 86400
    expansion = 1.2  # rows per interaction (views + funnel + payments), refined while running

    def __init__(self, world: World, out_dir: str) -> None:
        self.world, self.out = world, out_dir
        rng, n = world.rng, world.num_items
        self.domain = rng.choice(len(DOMAINS), size=n, p=DOMAIN_P)
        self.raw_id = np.zeros(n, np.int64)
        for d in range(len(DOMAINS)):  # ids restart at 0 in every domain
            idx = np.nonzero(self.domain == d)[0]
            self.raw_id[idx] = rng.permutation(idx.size)
        per_cluster = max(1, n // 25 // world.num_clusters)
        self.brand = world.item_cluster * per_cluster + rng.integers(0, per_cluster, n)
        self.num_brands = world.num_clusters * per_cluster
        base = rng.normal(6.0, 1.0, world.num_clusters)[world.item_cluster]
        self.price = np.round(np.exp(base + 0.4 * rng.normal(size=n)), 2).astype(np.float32)
        self.user_os = rng.integers(0, len(OS_NAMES), world.num_users)
        self.sinks: dict[tuple[str, int], ParquetSink] = {}
        self.files: list[str] = []

    def expand(self, sl: SliceEvents) -> dict[str, dict[str, np.ndarray]]:
        rng, n = self.world.rng, len(sl)
        click = rng.random(n) < P_CLICK + P_CLICK_AFFINITY * sl.affinity
        cart = click & (rng.random(n) < P_CART)
        order = cart & (rng.random(n) < P_ORDER)
        sub = rng.choice(len(SUBDOMAINS), size=n, p=SUBDOMAIN_P)
        parts, t = [], sl.time.copy()
        for stage, mask in enumerate((np.ones(n, bool), click, cart, order)):
            if stage:
                t = t + rng.uniform(1.0, 4.0, n)
            parts.append((np.nonzero(mask)[0], t[mask], stage))
        idx = np.concatenate([p[0] for p in parts])
        stage = np.concatenate([np.full(p[0].size, p[2]) for p in parts])
        items = sl.item[idx]
        subdomain = np.array(SUBDOMAINS + ("cart", "checkout"))[
            np.where(stage == 2, 4, np.where(stage == 3, 5, sub[idx]))
        ]
        names = np.array(["view", "click", "add-to-cart", "order", "transaction"])
        offers = self.domain[items] == DOMAINS.index("offers")
        action = names[np.where((stage == 3) & offers, 4, stage)]
        events = {
            "_t": np.concatenate([p[1] for p in parts]),
            "_domain": self.domain[items],
            "user_id": sl.user[idx],
            "item_id": self.raw_id[items],
            "subdomain": subdomain,
            "action_type": action,
            "os": np.array(OS_NAMES)[self.user_os[sl.user[idx]]],
        }
        o = np.nonzero(order)[0]
        payments = {
            "_t": t[o] + rng.uniform(5.0, 30.0, o.size),
            "user_id": sl.user[o],
            "brand_id": self.brand[sl.item[o]],
            "price": self.price[sl.item[o]],
        }
        return {"events": events, "payments": payments}

    def _sink(self, domain: str, day: int, schema: pa.Schema) -> ParquetSink:
        key = (domain, day)
        if key not in self.sinks:
            path = os.path.join(self.out, domain, "events", f"{day:05d}.pq")
            self.sinks[key] = ParquetSink(path, schema)
        return self.sinks[key]

    def write(self, streams: dict[str, dict[str, np.ndarray]], t0: float) -> None:
        for name, cols in streams.items():
            day = (cols["_t"] // 86400).astype(np.int64)
            ts = (START * 1000 + cols["_t"] * 1000).astype(np.int64)
            domain = cols["_domain"] if name == "events" else np.full(day.size, 3)
            for d, dy in sorted(set(zip(domain.tolist(), day.tolist()))):
                m = (domain == d) & (day == dy)
                dname = DOMAINS[d] if d < 3 else "payments"
                schema = EVENTS if d < 3 else PAYMENTS
                out = {k: v[m] for k, v in cols.items() if not k.startswith("_")}
                self._sink(dname, dy, schema).write({"timestamp": ts[m], **out})
        if streams["events"]["_t"].size:  # days that can no longer receive rows
            today = int(streams["events"]["_t"].min() // 86400)
            for key in [k for k in self.sinks if k[1] < today - 1]:
                self.files.append(self.sinks.pop(key).close())

    def close(self) -> list[str]:
        self.files += [s.close() for s in self.sinks.values()]
        self.sinks = {}
        return sorted(self.files) + self._catalogs()

    def _catalogs(self) -> list[str]:
        w, rng, files = self.world, self.world.rng, []
        sub = w.item_cluster * 4 + (np.arange(w.num_items) % 4)
        for d, name in enumerate(DOMAINS):
            idx = np.nonzero(self.domain == d)[0]
            idx = idx[np.argsort(self.raw_id[idx])]
            schema = pa.schema(
                [
                    ("item_id", pa.int64()),
                    ("brand_id", pa.int64()),
                    ("category", pa.int64()),
                    ("subcategory", pa.int64()),
                    ("price", pa.float32()),
                    ("embedding", pa.list_(pa.float32())),
                ]
            )
            files.append(
                write_table(
                    os.path.join(self.out, name, "items.pq"),
                    {
                        "item_id": self.raw_id[idx],
                        "brand_id": self.brand[idx],
                        "category": w.item_cluster[idx],
                        "subcategory": sub[idx],
                        "price": self.price[idx],
                        "embedding": list_array(w.item_embedding[idx]),
                    },
                    schema,
                )
            )
        socdem = np.where(
            rng.random(w.num_users) < 0.7, w.prefs[:, 0] % 8, rng.integers(0, 8, w.num_users)
        )
        files.append(
            write_table(
                os.path.join(self.out, "users.pq"),
                {
                    "user_id": np.arange(w.num_users),
                    "socdem_cluster": socdem,
                    "region": rng.integers(0, 80, w.num_users),
                },
                pa.schema(
                    [
                        ("user_id", pa.int64()),
                        ("socdem_cluster", pa.int64()),
                        ("region", pa.int64()),
                    ]
                ),
            )
        )
        per = self.num_brands // w.num_clusters
        brand_emb = w.centroids[np.arange(self.num_brands) // per]
        brand_emb = brand_emb + 0.2 * rng.normal(size=(self.num_brands, EMBED_DIM))
        files.append(
            write_table(
                os.path.join(self.out, "brands.pq"),
                {
                    "brand_id": np.arange(self.num_brands),
                    "embedding": list_array(brand_emb),
                },
                pa.schema([("brand_id", pa.int64()), ("embedding", pa.list_(pa.float32()))]),
            )
        )
        return files
