"""An independent plain-PyTorch SASRec (BCE, one negative per position) for recipe ablations.

    python benchmarks/sasrec_reference.py --data ../shared/data/amazon/Toys_and_Games.txt \
        [--ablation | recipe flags, e.g. --init uniform --pos start]

Not genrec: a second implementation of SASRec as the S3-Rec code trains it (left-padded
sequences, post-LN GELU blocks with a 4x feed-forward and no dropout inside it, N(0, 0.02)
init, one uniform negative per position, Adam 1e-3, batch 256), scored with the same
leave-one-out, full-catalog, history-excluded protocol as benchmarks/quality.py, test
metrics at the best validation NDCG@10. Each flag switches one part of the recipe to
genrec's choice, so a run tells which part moves the metrics. `--ablation` runs the recipe
and each single change at once (one process each; meant for a GPU) and prints one JSON line
with every result; otherwise one run prints one JSON line. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load(path):
    seqs = []
    for line in open(path):
        ids = [int(x) for x in line.split()]
        if len(ids) > 1:
            seqs.append(ids[1:])
    n_items = max(max(s) for s in seqs)
    return seqs, n_items


def pad_left(rows, L):
    out = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-L:]
        if r:
            out[i, L - len(r) :] = r
    return out


class Block(nn.Module):
    def __init__(self, d, h, ffn, drop, adrop, post_ln, act, ffn_drop=None):
        super().__init__()
        self.h, self.post_ln = h, post_ln
        # dropout inside the feed-forward: the SASRec paper's (pre-LN) block has it, the
        # S3-Rec code's Intermediate (post-LN) has none
        ffn_drop = (not post_ln) if ffn_drop is None else ffn_drop
        self.inner_drop = nn.Dropout(drop) if ffn_drop else nn.Identity()
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.n1, self.n2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.f1, self.f2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.drop, self.adrop, self.act = nn.Dropout(drop), adrop, act

    def attn(self, x, mask):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.adrop if self.training else 0.0
        )
        return self.o(a.transpose(1, 2).reshape(B, L, D))

    def ffn(self, x):
        return self.f2(self.inner_drop(self.act(self.f1(x))))

    def forward(self, x, mask):
        if self.post_ln:  # BERT / S3-Rec
            x = self.n1(x + self.drop(self.attn(x, mask)))
            return self.n2(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attn(self.n1(x), mask))
        return x + self.drop(self.ffn(self.n2(x)))


class HashedItems(nn.Module):
    """Item i's vector = sum of rows h_k(i) of a `rows`-row table (k < hashes), like
    genrec's k-hash tables; id 0 (padding) is the zero vector. `weight` is the catalog."""

    def __init__(self, n_items, d, rows, hashes, seed=1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        drawn = torch.randint(rows, (n_items + 1, hashes), generator=g)
        # only the rows some item hashes to: the same collisions and the same training as
        # the full `rows`-row table (an untouched row never moves), ~7x fewer rows for Adam
        used, compact = drawn.unique(return_inverse=True)
        self.table = nn.Embedding(len(used), d)
        self.register_buffer("rows", compact)
        self.n = n_items + 1

    def forward(self, ids):
        return self.table(self.rows[ids]).sum(-2) * (ids > 0).unsqueeze(-1)

    @property
    def weight(self):
        return self.forward(torch.arange(self.n, device=self.rows.device))


class SASRec(nn.Module):
    def __init__(self, n_items, a):
        super().__init__()
        d = a.dim
        if a.hashes:
            self.item = HashedItems(n_items, d, a.rows, a.hashes)
        else:
            self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        # genrec adds the (single, on Amazon) action's embedding to every item token
        self.action = nn.Parameter(torch.zeros(d)) if a.action_std >= 0 else None
        self.drop_before_pos = a.drop_before_pos
        self.pos = nn.Embedding(a.max_len, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(a.dropout)
        act = F.gelu if a.act == "gelu" else F.relu
        ffn_drop = None if a.ffn_dropout < 0 else bool(a.ffn_dropout)
        self.blocks = nn.ModuleList(
            Block(d, a.heads, a.ffn, a.dropout, a.attn_dropout, a.post_ln, act, ffn_drop)
            for _ in range(a.layers)
        )
        self.final = nn.LayerNorm(d, eps=1e-12) if not a.post_ln else nn.Identity()
        self.pos_mode = a.pos
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if a.init != "uniform":  # (uniform_0.02 changes the items only)
                    m.weight.data.normal_(0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.data.zero_()
        table = self.item.table if a.hashes else self.item
        k = max(1, a.hashes)  # the sum of k rows gets the per-coordinate std
        if a.init == "uniform":  # genrec's item init: per-coordinate std ~ 1/sqrt(d)
            b = math.sqrt(3.0 / d / k)
            table.weight.data.uniform_(-b, b)
        elif a.init == "uniform_0.02":  # genrec's SASRec configs: uniform at std 0.02
            b = 0.02 * math.sqrt(3.0 / k)
            table.weight.data.uniform_(-b, b)
        elif a.hashes:
            table.weight.data.normal_(0, 0.02 / math.sqrt(k))
        if not a.hashes:
            self.item.weight.data[0] = 0
        if self.action is not None:
            self.action.data.normal_(0, a.action_std)

    def forward(self, seq):
        B, L = seq.shape
        valid = seq > 0
        if self.pos_mode == "end":  # slot numbers of a left-padded max_len row
            M = self.pos.num_embeddings
            pos = torch.arange(M - L, M, device=seq.device).expand(B, L)
        else:  # from the first real item
            first = L - valid.sum(1, keepdim=True)
            pos = (torch.arange(L, device=seq.device)[None] - first).clamp_min(0)
        e = self.item(seq)
        if self.action is not None:
            e = e + self.action * valid.unsqueeze(-1)
        if isinstance(self.final, nn.Identity):  # post-LN: LayerNorm then dropout
            x = self.drop(self.ln(e + self.pos(pos)))
        elif self.drop_before_pos:  # genrec: dropout on the tokens, positions added after
            x = self.drop(e) + self.pos(pos)
        else:
            x = self.drop(e + self.pos(pos))
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=seq.device))
        mask = (causal[None] & valid[:, None, :]) | torch.eye(
            L, dtype=torch.bool, device=seq.device
        )
        mask = mask[:, None]
        for b in self.blocks:
            x = b(x, mask)
        return self.final(x)


def block_pairs(ref_block, genrec_block):
    """(reference module, genrec module) pairs of one SASRec block (genrec's
    `SASRecBlock`, either block kind), weight for weight."""
    g = genrec_block
    r = ref_block
    return [(r.qkv, g.qkv), (r.o, g.out), (r.n1, g.norm1), (r.n2, g.norm2),
            (r.f1, g.ffn[0]), (r.f2, g.ffn[3])]  # fmt: skip


@torch.no_grad()
def copy_genrec_weights(ref, item_vectors, action, encoder):
    """A genrec SASRec's weights into this model: `item_vectors` [n_items, d] are items
    1..n (their k rows summed), `action` the one action's vector (None: no action token),
    `encoder` genrec's post-LN `SASRecEncoder`. Duck-typed: no genrec import here."""
    ref.item.weight.zero_()
    ref.item.weight[1:] = item_vectors
    if action is not None:
        ref.action.copy_(action)
    ref.pos.weight.copy_(encoder.pos_emb.weight[: ref.pos.num_embeddings])
    ref.ln.load_state_dict(encoder.input_norm.state_dict())
    for rb, gb in zip(ref.blocks, encoder.blocks):
        for rm, gm in block_pairs(rb, gb):
            rm.load_state_dict(gm.state_dict())


def evaluate(model, seqs_in, targets, hist_mask_rows, n_items, dev, bs=2048):
    model.eval()
    hits = {5: 0.0, 10: 0.0}
    ndcg = {5: 0.0, 10: 0.0}
    with torch.no_grad():
        W = model.item.weight
        for s in range(0, len(seqs_in), bs):
            x = torch.from_numpy(seqs_in[s : s + bs]).to(dev)
            h = model(x)[:, -1]
            sc = h @ W.T
            sc[:, 0] = -1e9
            hr, hc = hist_mask_rows
            sel = (hr >= s) & (hr < s + bs)
            sc[hr[sel] - s, hc[sel]] = -1e9
            top = sc.topk(10, dim=1).indices
            t = torch.from_numpy(targets[s : s + bs]).to(dev)
            match = top == t[:, None]
            rank = torch.where(match.any(1), match.float().argmax(1), torch.full_like(t, 99))
            for k in (5, 10):
                hit = rank < k
                hits[k] += float(hit.sum())
                ndcg[k] += float((1.0 / torch.log2(rank[hit].float() + 2)).sum())
    n = len(targets)
    model.train()
    return {f"R@{k}": hits[k] / n for k in (5, 10)} | {f"N@{k}": ndcg[k] / n for k in (5, 10)}


def run(a):
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    dev = a.device
    seqs, n_items = load(a.data)
    L = a.max_len
    train = [s[:-2] for s in seqs if len(s) >= 4]
    tr = pad_left(train, L + 1)
    tr_in, tr_tgt = tr[:, :-1], tr[:, 1:]
    if not a.first_target:  # S3-Rec's: a target needs an item before it
        tr_tgt = tr_tgt * (tr_in > 0)
    va_in = pad_left([s[:-2] for s in seqs], L)
    va_t = np.array([s[-2] for s in seqs])

    def hist(rows):
        r = [i for i, h in enumerate(rows) for _ in h]
        c = [x for h in rows for x in h]
        return torch.tensor(r, device=dev), torch.tensor(c, device=dev)

    va_h = hist([sorted(set(s[:-2])) for s in seqs])
    te_in = pad_left([s[:-1] for s in seqs], L)
    te_t = np.array([s[-1] for s in seqs])
    te_h = hist([sorted(set(s[:-1])) for s in seqs])
    model = SASRec(n_items, a).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=a.wd)
    tr_in_t, tr_tgt_t = torch.from_numpy(tr_in).to(dev), torch.from_numpy(tr_tgt).to(dev)
    lengths = ((tr_in_t > 0) | (tr_tgt_t > 0)).sum(1).clamp_min(1)  # columns a row needs
    best, best_ep, bad, best_state, curve = -1.0, -1, 0, None, []
    t0 = time.time()
    for ep in range(a.epochs):
        if time.time() - t0 > a.max_seconds:
            print(f"[{a.name}] time limit at epoch {ep}", file=sys.stderr, flush=True)
            break
        perm = torch.randperm(len(tr_in_t), device=dev)
        tot = 0.0
        for s in range(0, len(perm), a.batch):
            idx = perm[s : s + a.batch]
            opt.zero_grad()
            n_tgt = float((tr_tgt_t[idx] > 0).sum())
            if a.chunks > 1:  # similar lengths together, each chunk cut to its longest
                idx = idx[lengths[idx].argsort()]
            pool = torch.randint(1, n_items + 1, (a.neg_pool,), device=dev) if a.neg_pool else None
            for part in idx.chunk(a.chunks):
                width = int(lengths[part].max())
                x, y = tr_in_t[part, L - width :], tr_tgt_t[part, L - width :]
                h = model(x)
                if pool is not None:
                    neg = pool[torch.randint(a.neg_pool, y.shape, device=dev)]
                else:
                    neg = torch.randint(1, n_items + 1, y.shape, device=dev)
                W = model.item
                pos_l = (h * W(y)).sum(-1)
                neg_l = (h * W(neg)).sum(-1)
                m = (y > 0).float()
                keep = m * (neg != y).float()
                loss = ((F.softplus(-pos_l) * m).sum() + (F.softplus(neg_l) * keep).sum()) / n_tgt
                loss.backward()  # gradients add up over the chunks: one step per batch
                tot += float(loss.detach())
            if a.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
        # mean loss per step, as genrec's epoch line
        msg = f"[{a.name}] ep {ep} loss {tot / math.ceil(len(perm) / a.batch):.4f}"
        if (ep + 1) % a.eval_every != 0:
            print(f"{msg} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        else:
            v = evaluate(model, va_in, va_t, va_h, n_items, dev)
            curve.append((ep, round(v["R@10"], 4), round(v["N@10"], 4)))
            print(f"{msg} valid {v} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            if v["N@10"] > best:
                best, best_ep, bad = v["N@10"], ep, 0
                best_state = {k: t.clone() for k, t in model.state_dict().items()}
            else:
                bad += 1
                if bad >= a.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    te = evaluate(model, te_in, te_t, te_h, n_items, dev)
    out = {
        "name": a.name,
        "epochs_run": ep + 1,
        "best_epoch": best_ep,
        "valid_N@10": round(best, 4),
        **{k: round(v, 4) for k, v in te.items()},
        "seconds": round(time.time() - t0, 1),
        "curve": curve,
    }
    print(json.dumps(out), flush=True)
    return out


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--name", default="run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--attn-dropout", type=float, default=0.5)
    p.add_argument("--post-ln", type=int, default=1)
    p.add_argument("--act", default="gelu")
    p.add_argument("--pos", default="end")
    p.add_argument("--init", default="normal", choices=["normal", "uniform", "uniform_0.02"])
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--chunks", type=int, default=1,
        help="run each batch as this many length-sorted chunks, each cut to its longest row "
        "(the same loss and step, fewer padded tokens: for CPUs)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--neg-pool", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=1e9)
    p.add_argument("--hashes", type=int, default=0, help="0: one row per item")
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--action-std", type=float, default=-1.0, help="< 0: no action token")
    p.add_argument("--drop-before-pos", type=int, default=0)
    p.add_argument(
        "--first-target", type=int, default=0,
        help="1: also train each row's first item as the target of a padding token",
    )  # fmt: skip
    p.add_argument(
        "--ffn-dropout", type=int, default=-1,
        help="dropout inside the feed-forward (1/0); -1: in the pre-LN block only",
    )  # fmt: skip
    return p


# each a single change from the recipe towards genrec's SASRec, and all of them together
ABLATION = {
    "recipe": [],
    # this script's post-LN block up to session 5 (the published Toys row was matched with it)
    "ffn_inner_dropout": ["--ffn-dropout", "1"],
    # and its first item trained as the target of the padding slot before it
    "session3_recipe": ["--ffn-dropout", "1", "--first-target", "1"],
    "positions_from_start": ["--pos", "start"],
    "prenorm_relu_ffn64": ["--post-ln", "0", "--act", "relu", "--ffn", "64"],
    "init_uniform_1_over_sqrt_d": ["--init", "uniform"],
    "negative_pool_512": ["--neg-pool", "512"],
    "grad_clip_1": ["--clip", "1.0"],
    "lr_3e-3": ["--lr", "3e-3"],
    "hashed_2_of_262k_rows": ["--hashes", "2"],
    "action_token_0.02": ["--action-std", "0.02"],
    "dropout_before_positions": ["--post-ln", "0", "--drop-before-pos", "1"],
    "all_of_genrec_session2": "--post-ln 0 --act relu --ffn 64 --pos start --init uniform "
    "--neg-pool 4096 --clip 1 --lr 3e-3".split(),
    # configs/amazon_toys_sasrec.yaml (session 4: dropout on item + position, as here)
    "genrec_sasrec_config": "--post-ln 0 --act relu --ffn 64 --pos start --neg-pool 512 "
    "--clip 1 --hashes 2 --action-std 0.02".split(),
    "item_init_uniform_0.02": ["--init", "uniform_0.02"],
    # configs/amazon_sports_sasrec.yaml in session 6 (row [8]) and now
    "genrec_sports_session6": "--hashes 2 --action-std 0.02 --pos start --clip 1 "
    "--init uniform_0.02".split(),
    "genrec_sports_session7": "--hashes 2 --clip 1 --init uniform_0.02".split(),
    # configs/amazon_sports_sasrec.yaml now: one row per item (kind: direct)
    "genrec_sports_config": "--clip 1 --init uniform_0.02".split(),
}


def ablation(argv: list[str]) -> None:
    import subprocess

    t0 = time.time()
    procs = {
        name: subprocess.Popen(
            [sys.executable, __file__, *argv, "--name", name, *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, extra in ABLATION.items()
    }
    results = {}
    for name, p in procs.items():
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"ablation run {name!r} failed (exit {p.returncode})")
        row = json.loads(out.strip().splitlines()[-1])
        row.pop("name")
        results[name] = row
    summary = {"benchmark": "sasrec_reference_ablation", "wall_s": round(time.time() - t0, 1)}
    print(json.dumps({**summary, "runs": results}), flush=True)


if __name__ == "__main__":
    if "--ablation" in sys.argv:
        ablation([a for a in sys.argv[1:] if a != "--ablation"])
    else:
        run(parser().parse_args())
