import itertools

import numpy as np
import pytest
import torch

from genrec.semantic.beam import CodeTrie, beam_search
from genrec.semantic.tokenizers import disambiguate


def catalog(n: int, sizes: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1)
    codes = disambiguate(codes)
    item_ids = rng.permutation(10 * n)[:n] + 1000
    return codes, item_ids


def prefix_step(batch: int, beam: int, vocab: int, seed: int):
    """Logits that depend on the user and the whole prefix (deterministic, random-looking)."""

    def step(prefix: torch.Tensor) -> torch.Tensor:
        user = torch.arange(batch * beam) // beam
        key = user * 7919 + seed
        for t in range(prefix.shape[1]):
            key = key * 31 + prefix[:, t] + 1
        g = torch.arange(vocab)
        return torch.sin(key.unsqueeze(1).double() * 0.37 + g * 1.3) * 4

    return step


def test_trie_children_are_exactly_the_valid_next_tokens():
    codes = np.array([[0, 1, 0], [0, 2, 0], [1, 1, 0], [0, 1, 1]])
    trie = CodeTrie(codes, np.array([10, 11, 12, 13]))
    row, tok, _ = trie.children(torch.tensor([0]))
    assert sorted(tok.tolist()) == [0, 1]
    assert trie.num_nodes == 1 + 2 + 3 + 4


def test_every_result_is_a_real_item_under_random_logits():
    codes, item_ids = catalog(500, [8, 8, 4])
    trie = CodeTrie(codes, item_ids)
    gen = torch.Generator().manual_seed(0)
    batch, beam, vocab = 16, 20, trie.vocab + 5  # extra logits for tokens no level uses

    def step(prefix):
        return torch.randn(batch * beam, vocab, generator=gen) * 5

    items, scores = beam_search(step, trie, batch_size=batch, beam_width=beam, top_k=10)
    valid = set(item_ids.tolist())
    invalid = sum(i not in valid for i in items.flatten().tolist())
    assert invalid == 0  # invalid-result rate 0
    assert torch.isfinite(scores).all()
    assert all(len(set(row)) == 10 for row in items.tolist())  # no duplicates per user
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_equals_brute_force_top_k(seed):
    codes, item_ids = catalog(60, [4, 3, 3], seed=seed)
    trie = CodeTrie(codes, item_ids)
    batch, beam, vocab, k = 3, 60, trie.vocab + 2, 7
    step = prefix_step(batch, beam, vocab, seed)
    items, scores = beam_search(step, trie, batch_size=batch, beam_width=beam, top_k=k)
    # brute force: the summed log-probability of every valid code, per user
    for b in range(batch):
        total = np.zeros(len(codes))
        for t in range(codes.shape[1]):
            prefix = torch.as_tensor(codes[:, :t])
            rows = torch.zeros(batch * beam, t, dtype=torch.long)
            logp = []
            for i in range(len(codes)):
                rows[b * beam] = prefix[i]
                logp.append(torch.log_softmax(step(rows)[b * beam], -1)[codes[i, t]].item())
            total += np.array(logp)
        best = np.argsort(-total, kind="stable")[:k]
        assert items[b].tolist() == item_ids[best].tolist()
        np.testing.assert_allclose(scores[b].numpy(), total[best], rtol=1e-5)


def test_factored_scores_and_small_catalog():
    # scores factor per level: beam search with beam >= items is the exact top-k
    codes = np.array(list(itertools.product(range(3), range(2), range(2))))
    item_ids = np.arange(len(codes))
    trie = CodeTrie(codes, item_ids)
    w = torch.tensor([[0.5, 2.0, -1.0], [1.0, -3.0, 0.0], [0.2, 0.1, 0.0]])

    def step(prefix):
        return w[prefix.shape[1]].expand(prefix.shape[0], 3)

    items, _ = beam_search(step, trie, batch_size=1, beam_width=12, top_k=3)
    lp = torch.log_softmax(w, -1)
    brute = sorted(range(12), key=lambda i: -sum(lp[t, codes[i, t]].item() for t in range(3)))
    assert items[0].tolist() == brute[:3]
    # a beam wider than the catalog: the tail is -1 with score -inf, never a fake item
    items, scores = beam_search(step, trie, batch_size=1, beam_width=20, top_k=15)
    assert sorted(items[0, :12].tolist()) == list(range(12))
    assert items[0, 12:].tolist() == [-1, -1, -1] and torch.isinf(scores[0, 12:]).all()


def test_duplicate_codes_rejected():
    with pytest.raises(ValueError, match="disambiguate"):
        CodeTrie(np.array([[0, 1], [0, 1]]), np.array([1, 2]))
