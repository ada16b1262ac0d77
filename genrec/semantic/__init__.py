"""Semantic IDs: item vectors -> short discrete codes (tokenizers), and constrained beam
search over the trie of valid codes. See README, "Semantic IDs (in progress)"."""
