"""Constrained beam search over a trie of valid codes: every result is a real item.

    trie = CodeTrie(codes, item_ids)           # codes [N, L] int64, unique rows
    items, scores = beam_search(step, trie, batch_size=B, beam_width=W, top_k=K)

`step(prefix)` is the model: prefix [B * W, t] int64 (the tokens chosen so far; rows
b * W ... b * W + W - 1 are user b's beams) -> logits [B * W, V] for token t, V >= every
level's vocabulary. Scores are summed log-softmax probabilities; at each level a beam may
only continue with tokens that lead to an existing code (the trie's children of its
node), so after L levels every surviving beam is a leaf, i.e. an item. Fewer than K valid
continuations (a catalog smaller than K) leave item -1 with score -inf in the tail.

The trie is stored level by level in CSR form: node n's children are
`child_token[child_ptr[n]:child_ptr[n + 1]]` (and their nodes `child_node[...]`), so the
mask of a batch of nodes is one gather + scatter. Memory: one entry per distinct prefix,
at most N * L int64 pairs (30M items x 4 levels: ~2 GB, less with shared prefixes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

StepFn = Callable[[torch.Tensor], torch.Tensor]


class CodeTrie:
    """The prefixes of `codes` [N, L] as a trie; leaves map back to `item_ids` [N]."""

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) != len(item_ids) or len(codes) == 0:
            raise ValueError(
                f"codes must be [N, L] with N == len(item_ids) > 0, got {codes.shape} "
                f"and {len(item_ids)} item ids"
            )
        if len(np.unique(codes, axis=0)) != len(codes):
            raise ValueError("codes are not unique; run disambiguate() first")
        if codes.min() < 0:
            raise ValueError("codes must be non-negative")
        self.levels = codes.shape[1]
        self.vocab = int(codes.max()) + 1
        # node ids: level by level; node of prefix codes[i, :t] for t = 0..L
        node_of = np.zeros((len(codes), self.levels + 1), dtype=np.int64)
        ptr, tok, child = [0], [], []
        next_node = 1  # node 0 is the root
        for t in range(self.levels):
            parent = node_of[:, t]
            pairs = np.stack([parent, codes[:, t]], axis=1)
            uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
            # uniq is sorted by (parent, token); parents of level t are contiguous ids
            node_of[:, t + 1] = next_node + inverse.reshape(-1)
            first_parent = parent.min()
            counts = np.bincount(uniq[:, 0] - first_parent)
            ptr.extend((ptr[-1] + np.cumsum(counts)).tolist())
            tok.append(uniq[:, 1])
            child.append(next_node + np.arange(len(uniq)))
            next_node += len(uniq)
        self.num_nodes = next_node
        self.child_ptr = torch.as_tensor(np.array(ptr, dtype=np.int64))
        self.child_token = torch.as_tensor(np.concatenate(tok))
        self.child_node = torch.as_tensor(np.concatenate(child))
        self.leaf_item = torch.full((next_node,), -1, dtype=torch.long)
        self.leaf_item[torch.as_tensor(node_of[:, -1])] = torch.from_numpy(
            np.array(item_ids, dtype=np.int64)  # a copy: the caller's array may be read-only
        )

    def children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For nodes [M]: (row [E], token [E], child node [E]) of every child edge."""
        start, end = self.child_ptr[nodes], self.child_ptr[nodes + 1]
        counts = end - start
        row = torch.repeat_interleave(torch.arange(nodes.numel()), counts)
        offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        edge = start[row] + offset
        return row, self.child_token[edge], self.child_node[edge]


@torch.no_grad()
def beam_search(
    step: StepFn,
    trie: CodeTrie,
    batch_size: int,
    beam_width: int,
    top_k: int,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Items [B, top_k] int64 and their scores [B, top_k] (summed log-probabilities),
    best first. top_k <= beam_width. `renormalize`: each level's softmax over the valid
    continuations only (a model trained that way); else over the whole vocabulary."""
    if not 1 <= top_k <= beam_width:
        raise ValueError(f"top_k must be in [1, beam_width={beam_width}], got {top_k}")
    b, w = batch_size, beam_width
    nodes = torch.zeros(b * w, dtype=torch.long)  # every beam at the root
    scores = torch.full((b, w), float("-inf"))
    scores[:, 0] = 0.0  # one live beam to start: no duplicates
    prefix = torch.zeros(b * w, 0, dtype=torch.long)
    for _ in range(trie.levels):
        logits = step(prefix)
        if logits.shape[0] != b * w or logits.shape[1] < trie.vocab:
            raise ValueError(
                f"step returned logits {tuple(logits.shape)}; expected [{b * w}, >= {trie.vocab}]"
            )
        vocab = logits.shape[1]
        allowed = torch.full((b * w, vocab), float("-inf"))
        next_node = torch.zeros(b * w, vocab, dtype=torch.long)
        row, token, child = trie.children(nodes)
        allowed[row, token] = 0.0
        next_node[row, token] = child
        if renormalize:  # dead beams (-inf score, every token allowed) stay dead
            logp = torch.log_softmax(logits.float() + allowed, dim=-1).nan_to_num(float("-inf"))
        else:
            logp = torch.log_softmax(logits.float(), dim=-1) + allowed
        cand = (scores.reshape(-1, 1) + logp).reshape(b, w * vocab)
        scores, flat = cand.topk(w, dim=1)
        beam = flat // vocab + torch.arange(b).unsqueeze(1) * w
        token = flat % vocab
        nodes = next_node.reshape(-1, vocab)[beam.reshape(-1), token.reshape(-1)]
        prefix = torch.cat([prefix[beam.reshape(-1)], token.reshape(-1, 1)], dim=1)
    items = trie.leaf_item[nodes].reshape(b, w)
    items = torch.where(torch.isfinite(scores), items, torch.full_like(items, -1))
    return items[:, :top_k], scores[:, :top_k]
