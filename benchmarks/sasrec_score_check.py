"""Score one genrec SASRec checkpoint twice: with genrec's scorer and with
benchmarks/sasrec_reference.py's `evaluate` on the same weights. Prints one JSON line.

    python benchmarks/sasrec_score_check.py --run-dir W/run-seed0 \
        --checkpoint W/run-seed0/checkpoints/step-NNNNNNNN --data ../shared/data/amazon/Sports_and_Outdoors.txt

Tells a protocol difference (split, candidates, history exclusion, metrics) from a training
one: equal numbers mean the two scorers agree. The run must be a post-LN SASRec on a text
(S3-Rec) data set; validation split, full catalog, history excluded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from genrec.config import load_config
from genrec.trainer.distributed import free_port, init_distributed
from genrec.trainer.epochs import EpochTrainer


def _reference():
    path = Path(__file__).with_name("sasrec_reference.py")
    spec = importlib.util.spec_from_file_location("sasrec_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the run's S3-Rec text file")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(str(Path(a.run_dir) / "config.yaml"), [])
    if cfg.model.kind != "sasrec" or cfg.model.sasrec_block != "post_ln":
        raise SystemExit(f"{a.run_dir}: needs a post_ln SASRec run, got {cfg.model.kind}")
    ctx = init_distributed(0, 1, "cpu", "gloo", master_port=free_port())
    trainer = EpochTrainer(cfg, ctx, log_metrics=False)
    trainer.restore(Path(a.checkpoint))
    ours = trainer.score_split("valid")

    ref_mod = _reference()
    seqs, n_items = ref_mod.load(a.data)
    m = cfg.model
    pos = "end" if m.sasrec_positions == "from_end" else "start"
    action_std = "0.02" if m.use_actions else "-1"
    args = ref_mod.parser().parse_args(
        f"--data x --pos {pos} --max-len {m.max_len} --action-std {action_std}".split()
    )
    ref = ref_mod.SASRec(n_items, args).eval()
    model = trainer.model.module
    ids = torch.arange(1, n_items + 1)
    with torch.no_grad():
        kjt = KeyedJaggedTensor(keys=["item_id"], values=ids, lengths=torch.tensor([n_items]))
        items = model.sparse(kjt)["item_id"].values()
    action = model.tokens.action_emb.weight[0] if m.use_actions else None
    ref_mod.copy_genrec_weights(ref, items, action, model.encoder)
    va_in = ref_mod.pad_left([s[:-2] for s in seqs], m.max_len)
    va_t = np.array([s[-2] for s in seqs])
    hist = [sorted(set(s[:-2])) for s in seqs]
    rows = torch.tensor([i for i, h in enumerate(hist) for _ in h])
    cols = torch.tensor([x for h in hist for x in h])
    theirs = ref_mod.evaluate(ref, va_in, va_t, (rows, cols), n_items, "cpu")
    out = {"benchmark": "sasrec_score_check", "checkpoint": a.checkpoint}
    for k in (5, 10):
        out[f"genrec_R@{k}"] = round(ours[f"recall@{k}"], 6)
        out[f"reference_R@{k}"] = round(theirs[f"R@{k}"], 6)
        out[f"genrec_N@{k}"] = round(ours[f"ndcg@{k}"], 6)
        out[f"reference_N@{k}"] = round(theirs[f"N@{k}"], 6)
    out["action_max_abs"] = float(model.tokens.action_emb.weight.abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
