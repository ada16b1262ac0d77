"""End-to-end trainer tests on real generated T-ECD data, 2 gloo ranks, TorchRec DMP.

One small data set is generated and prepared (Ray) once per module. Runs:
  full    uninterrupted one pass, capped at STEPS steps
  half    the same config stopped at STEPS // 2 (a checkpoint is left there)
  resumed `half` continued to STEPS from its checkpoint
and the tests compare them: the loss falls, resumed == uninterrupted (weights, position,
steps), and a 2-rank checkpoint loads into 1 rank (and back) with identical weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from genrec.trainer import checkpoint as ckpt
from genrec.trainer.launch import train

from ..dist_utils import run_on_ranks
from .helpers import final_model_state, make_prepared, tiny_config

STEPS = 24


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local) -> Path:
    return make_prepared(
        tmp_path_factory.mktemp("trainer"), users=300, events=30_000, items=600, seed=3
    )


def _cfg(base: Path, run: str, *extra: str):
    return tiny_config(
        base / "prepared",
        base / run,
        "trainer.batch_size=16",
        "trainer.eval_batches=2",
        "model.retrieval.num_negatives=64",
        "embeddings.tables=[{name: item, num_embeddings: 4096, dim: 32, features: [item_id]}]",
        # the resume point (STEPS // 2) falls inside the warm-up: the schedule must resume too
        f"trainer.warmup_steps={STEPS}",
        # linear sketches: a 2-rank run resharded to 1 rank counts exactly like 2 ranks
        "embeddings.frequency.conservative=false",
        *extra,
    )


@pytest.fixture(scope="module")
def runs(prepared):
    full = _cfg(prepared, "full", f"trainer.max_steps={STEPS}", "trainer.keep_last=100")
    train(full, resume=False)
    half = _cfg(prepared, "half", f"trainer.max_steps={STEPS // 2}")
    train(half, resume=False)
    shutil.copytree(prepared / "half", prepared / "resumed")
    resumed = _cfg(prepared, "resumed", f"trainer.max_steps={STEPS}")
    train(resumed, resume=True)
    return prepared


def test_two_rank_training_lowers_loss(runs):
    rows = [
        r
        for r in (runs / "full" / "metrics.csv").read_text().splitlines()[1:]
        if r.startswith("step,") and ",loss," in r
    ]
    losses = [float(r.split(",")[4]) for r in rows]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"loss did not fall: first {first:.3f} last {last:.3f}"


def test_resumed_equals_uninterrupted(runs):
    full, s_full = final_model_state(runs / "full")
    resumed, s_res = final_model_state(runs / "resumed")
    half = json.loads((ckpt.latest_checkpoint(runs / "half") / ckpt.STATE_FILE).read_text())
    assert half["step"] == STEPS // 2
    assert s_full["step"] == s_res["step"] == STEPS
    assert s_full["position"] == s_res["position"]
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


def _load_at_world(rank: int, world_size: int, path: str) -> dict:
    """Build the trainer at this world size, restore `path`, return the gathered weights."""
    from genrec.config import from_dict
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.stream_runner import StreamTrainer

    state = ckpt.read_state(path)
    cfg = from_dict(state["config"])
    cfg.trainer.world_size = world_size
    cfg.trainer.run_dir = str(Path(path).parent.parent)
    trainer = StreamTrainer(cfg, context_from_initialized("cpu"))
    trainer.restore(Path(path))
    out = {}
    for k, v in trainer.model.state_dict().items():
        if isinstance(v, ShardedTensor):  # assemble the full table on rank 0
            full = torch.zeros(v.size()) if rank == 0 else None
            v.gather(dst=0, out=full)
            v = full
        out[k] = None if v is None else v.detach().clone()
    trainer.logger.close()
    return {
        "weights": out if rank == 0 else None,
        "step": trainer.step,
        "position": trainer.position.to_dict(),
    }


def test_checkpoint_reshards_2_to_1_and_1_to_2(runs):
    expected, state = final_model_state(runs / "full")
    path = str(ckpt.latest_checkpoint(runs / "full"))
    for world in (1, 2):
        results = run_on_ranks(_load_at_world, world_size=world, args=(path,))
        got = results[0]["weights"]
        assert {r["step"] for r in results} == {state["step"]}
        assert results[0]["position"] == state["position"]
        for k, v in expected.items():
            key = k if k in got else "_dmp_wrapped_module." + k
            torch.testing.assert_close(got[key], v, rtol=0, atol=0, msg=k)


def test_mid_window_checkpoint_resumed_on_1_rank_counts_like_2_ranks(runs):
    """A 2-rank run stopped inside a window, resumed on 1 rank to that window's end: its
    popularity state (frequency sketch, baseline counts) equals the uninterrupted 2-rank run's
    at the same window end: every rank's delta carried once, none lost or counted twice."""
    mid = STEPS // 2 - 2  # windows here are ~4 steps long and the 12th step ends one
    train(_cfg(runs, "mid", f"trainer.max_steps={mid}"), resume=False)
    stop = ckpt.latest_checkpoint(runs / "mid")
    position = ckpt.read_state(stop)["position"]
    assert ckpt.read_state(stop)["history"][-1]["window"] < position["window"], "not mid-window"
    owns = [ckpt.read_tensors(stop, r) for r in range(2)]
    assert all(float(o["frequency.delta.total"]) > 0 for o in owns)  # deltas to carry
    shutil.copytree(runs / "mid", runs / "half_to_1")
    one = _cfg(runs, "half_to_1", "trainer.world_size=1", f"data.windows=[{position['window']}]")
    train(one, resume=True)
    got_path = ckpt.latest_checkpoint(runs / "half_to_1")
    got = ckpt.read_shared_tensors(got_path)
    assert ckpt.read_state(got_path)["history"][-1]["window"] == position["window"]
    at_end = [
        p
        for p in ckpt.list_checkpoints(runs / "full")
        if ckpt.read_state(p)["history"][-1:]
        and ckpt.read_state(p)["history"][-1]["window"] == position["window"]
    ]
    want = ckpt.read_shared_tensors(at_end[0])  # the first one after the window ended
    for key in ("frequency.synced.counters", "frequency.synced.total", "baseline.counts"):
        assert float(want[key].sum()) > 0, key
        assert torch.equal(got[key], want[key]), key


def _train_nccl_emulated(rank: int, world_size: int, base: str) -> dict:
    """Train under the NCCL emulation across a window end and a checkpoint, then resume."""
    from genrec.embeddings.frequency import CountMinSketch
    from genrec.trainer.distributed import all_gather_rows, context_from_initialized
    from genrec.trainer.stream_runner import StreamTrainer

    from .nccl_emulation import install

    install()
    ctx = context_from_initialized("cpu")
    # the emulation bites: the old trainer's calls (CPU tensors on the default group) fail
    caught = []
    for old_call in (
        lambda: dist.all_reduce(torch.ones(2)),
        lambda: CountMinSketch(1, 8, conservative=False).all_reduce_(),
    ):
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            old_call()
        caught.append(True)
    rows = all_gather_rows(torch.full((rank + 1, 2), float(rank)))
    run = _cfg(Path(base), "nccl", "trainer.max_steps=6", "trainer.checkpoint_every=3")
    trainer = StreamTrainer(run, ctx)
    history = trainer.run(resume=False, progress=False)
    again = StreamTrainer(_cfg(Path(base), "nccl", "trainer.max_steps=7"), ctx)
    again.run(resume=True, progress=False)  # restore + one more step, still under NCCL rules
    return {"caught": caught, "rows": rows.tolist(), "history": history, "step": again.step}


def test_trainer_collectives_are_nccl_safe(prepared):
    """2 gloo ranks whose default group refuses CPU tensors from genrec, as NCCL does: a run
    through a window end (metrics, replica check, frequency and baseline sync), checkpoints
    and a resume completes, its host state going over the gloo host group."""
    out = run_on_ranks(_train_nccl_emulated, world_size=2, args=(str(prepared),))
    assert all(o["caught"] == [True, True] for o in out)
    assert out[0]["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert out[0]["history"] and out[0]["history"][0]["positions"] > 0
    assert [o["step"] for o in out] == [7, 7]


def _sharded_and_full_top_k(rank: int, world_size: int, base: str) -> dict:
    """This rank's 16 sequences scored over the catalog: model.top_k (every rank the whole
    catalog) and sharded_top_k (each rank 1/W of it, merged)."""
    import pyarrow.dataset as pads

    from genrec.data_pipeline.batch import sequences_from_rows
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.sharded_eval import sharded_top_k
    from genrec.trainer.stream_runner import StreamTrainer

    cfg = _cfg(Path(base), "sharded_eval")
    trainer = StreamTrainer(cfg, context_from_initialized("cpu"))
    first_window = sorted((Path(base) / "prepared").glob("window=*"))[0]
    rows = pads.dataset(str(first_window), format="parquet").head(32).slice(16 * rank, 16)
    batch = sequences_from_rows(rows, cfg.model.max_len)
    trainer.model.eval()
    module = trainer.model.module
    catalog = trainer.catalog[:-1]  # an odd size: the last slice is padded
    full = module.top_k(batch, catalog, 10, exclude_history=True, block=100)
    got = sharded_top_k(module, batch, catalog, 10, exclude_history=True, block=100)
    trainer.logger.close()
    return {"full": [t.tolist() for t in full], "sharded": [t.tolist() for t in got]}


def test_sharded_top_k_equals_full_catalog_top_k(prepared):
    """2 ranks, each scoring half the catalog (blocks of 100, history excluded): every
    rank's top-10 scores and targets equal the whole-catalog top-10 of its positions, and
    the ids too, but for items whose scores tie (hashed ids sharing a row score alike, and
    the matmuls differ in shape, so the last bits may too: tied items may swap places)."""
    out = run_on_ranks(_sharded_and_full_top_k, world_size=2, args=(str(prepared),))
    tol = 1e-5
    for o in out:
        (f_ids, f_s, f_t), (s_ids, s_s, s_t) = o["full"], o["sharded"]
        assert len(f_ids) > 10 and len(f_ids[0]) == 10 and s_t == f_t
        torch.testing.assert_close(torch.tensor(s_s), torch.tensor(f_s), rtol=0, atol=tol)
        for fi, fs, si in zip(f_ids, f_s, s_ids):
            for j, (a, b) in enumerate(zip(fi, si)):
                if a != b:  # b must tie with the item the full ranking put there
                    tie = [fs[i] for i, x in enumerate(fi) if x == b] or [fs[-1]]
                    assert abs(tie[0] - fs[j]) <= tol, (fi, si, fs)
    assert out[0]["full"][0] != out[1]["full"][0]  # the ranks scored different positions


def _first_step_updates(rank: int, world_size: int, base: str) -> dict:
    """One training step from the same init with warm-up off and over 4 steps: the change of
    every weight."""
    import pyarrow.dataset as pads

    from genrec.data_pipeline.batch import sequences_from_rows
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.stream_runner import StreamTrainer

    first_window = sorted((Path(base) / "prepared").glob("window=*"))[0]
    rows = pads.dataset(str(first_window), format="parquet").head(16)
    out = {}
    for warmup in (0, 4):
        cfg = _cfg(Path(base), f"warmup{warmup}", f"trainer.warmup_steps={warmup}")
        trainer = StreamTrainer(cfg, context_from_initialized("cpu"))
        before = {k: v.detach().clone() for k, v in _local_weights(trainer).items()}
        trainer.train_step(sequences_from_rows(rows, cfg.model.max_len), trainer.window_metrics())
        out[warmup] = {k: v - before[k] for k, v in _local_weights(trainer).items()}
        trainer.logger.close()
    return out


def _local_weights(trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v
        for k, v in trainer.model.state_dict().items()
        if v.dtype.is_floating_point
    }


def test_warmup_scales_the_first_updates_of_both_optimizers(prepared):
    """AdamW's and row-wise Adagrad's first steps are lr * g / |g|: warm-up over 4 steps must
    shrink every weight's first update exactly 4 times (sparse table and dense layers alike)."""
    upd = run_on_ranks(_first_step_updates, world_size=1, args=(str(prepared),))[0]
    moved = [k for k, d in upd[0].items() if d.numel() and d.abs().max() > 0]
    assert any("embedding" in k for k in moved) and any("encoder" in k for k in moved), moved
    for k in moved:
        torch.testing.assert_close(upd[4][k] * 4, upd[0][k], rtol=1e-3, atol=1e-6, msg=k)
    # and the first AdamW step is a full lr (its bias correction starts at step 1, not 2:
    # the optimizer state created up front must not count as a step)
    lr = tiny_config("p", "r").trainer.lr
    for k in moved:
        if "encoder" in k and k.endswith("weight"):
            assert float(upd[0][k].abs().max()) == pytest.approx(lr, rel=1e-3), k


def test_killed_launcher_takes_its_workers_down(prepared, tmp_path):
    """SIGKILL the launching process mid-run: its 2 spawned ranks must exit, not train on as
    orphans holding the cores and writing into the run directory.

    The launcher starts with SIGINT ignored, as every `cmd &` of a non-interactive shell
    (nohup jobs, scripts) does: torch's spawn only arranges a SIGINT on parent death, which
    such workers inherit as ignored (they trained on for half an hour before the fix)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from genrec.config import dump_config
    from genrec.trainer.launch import WORKERS_DIR

    run = prepared / "orphans"
    # batches of 2 sequences: a pass long enough to be mid-run when the launcher is killed
    cfg = _cfg(prepared, "orphans", "trainer.batch_size=2")
    (tmp_path / "cfg.yaml").write_text(dump_config(cfg))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "genrec.cli", "train", str(tmp_path / "cfg.yaml"), "--no-resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    files = [run / WORKERS_DIR / f"rank-{r}.json" for r in range(2)]
    deadline = time.time() + 120
    while not all(f.exists() for f in files):
        assert launcher.poll() is None, "the run ended before its workers registered"
        assert time.time() < deadline, "workers never registered"
        time.sleep(0.2)
    pids = [json.loads(f.read_text())["pid"] for f in files]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"

    deadline = time.time() + 30
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:  # never leave them running past the test
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"ranks {survivors} outlived their launcher"
    assert not (run / "summary.json").exists(), "the run finished before the kill: lengthen it"


def test_plot_writes_curves(runs):
    from genrec.trainer.plot import plot_run

    paths = plot_run(runs / "full")
    names = {p.name for p in paths}
    assert {"loss.png", "throughput.png", "input_stall.png", "window_metrics.png"} <= names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_evaluate_scores_a_window_like_the_progressive_metric(prepared):
    """`evaluate` in stream mode: window w scored with the weights and counts frozen at the
    end of window w-1 equals the progressive metric that training logged for w, when
    training evaluates only each window's first batch per rank (trainer.eval_batches=1),
    which it scores before learning from it. 2 ranks both times."""
    from genrec.trainer.launch import evaluate

    cfg = _cfg(prepared, "windows", "trainer.eval_batches=1", "trainer.keep_last=100")
    cfg.trainer.max_steps = STEPS
    train(cfg, resume=False)
    run = prepared / "windows"
    history = ckpt.read_state(ckpt.latest_checkpoint(run))["history"]
    assert len(history) >= 2, history
    prev, window = history[-2], history[-1]
    at_prev_end = [
        p
        for p in ckpt.list_checkpoints(run)
        if [r["window"] for r in ckpt.read_state(p)["history"]][-1:] == [prev["window"]]
    ]
    assert len(at_prev_end) == 1, at_prev_end
    cfg.data.windows = [window["window"]]
    got = evaluate(cfg, checkpoint=str(at_prev_end[0]))
    assert [r["window"] for r in got["windows"]] == [window["window"]]
    row = got["windows"][0]
    assert row["positions"] == window["positions"] > 0
    for key in (
        "model/recall@10",
        "model/ndcg@10",
        "most_popular/recall@10",
        "most_popular/ndcg@10",
    ):
        assert row[key] == pytest.approx(window[key], abs=1e-9), key
    # and the newest checkpoint scores the same window differently: it has learned from it
    newer = evaluate(cfg)["windows"][0]
    assert newer["positions"] == row["positions"]
    assert (newer["model/recall@10"], newer["model/ndcg@10"]) != (
        row["model/recall@10"],
        row["model/ndcg@10"],
    )


def test_evaluate_without_a_checkpoint_says_what_to_do(tmp_path):
    from genrec.trainer.evaluate import resolve_checkpoint

    cfg = tiny_config(tmp_path / "prepared", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint: train first"):
        resolve_checkpoint(cfg, None)
    with pytest.raises(FileNotFoundError, match="is not a genrec checkpoint"):
        resolve_checkpoint(cfg, str(tmp_path))


def _warm_start(rank: int, world_size: int, base: str, source: str) -> dict:
    """A new run built with trainer.init_from=`source`: its weights before the first step,
    and after one step."""
    import pyarrow.dataset as pads

    from genrec.data_pipeline.batch import sequences_from_rows
    from genrec.trainer.distributed import context_from_initialized
    from genrec.trainer.loop import build_runner

    cfg = _cfg(Path(base), "warm", f"trainer.init_from={source}")
    trainer = build_runner(cfg, context_from_initialized("cpu"))
    fresh = {k: v.detach().clone() for k, v in _local_weights(trainer).items()}
    trainer.init_from(Path(cfg.trainer.init_from))
    before = {k: v.detach().clone() for k, v in _local_weights(trainer).items()}
    first_window = sorted((Path(base) / "prepared").glob("window=*"))[0]
    rows = pads.dataset(str(first_window), format="parquet").head(16)
    trainer.train_step(sequences_from_rows(rows, cfg.model.max_len), trainer.window_metrics())
    after = {k: v.detach().clone() for k, v in _local_weights(trainer).items()}
    trainer.logger.close()
    return {"fresh": fresh, "before": before, "after": after, "step": trainer.step}


def test_init_from_starts_from_the_checkpoint_weights(runs):
    """--init-from: the new run's first step starts from the source checkpoint's weights
    (not the seed's init), with a fresh step counter, and then trains on."""
    expected, _ = final_model_state(runs / "full")
    path = str(ckpt.latest_checkpoint(runs / "full"))
    out = run_on_ranks(_warm_start, world_size=1, args=(str(runs), path))[0]
    assert out["step"] == 0
    changed = 0
    for k, v in out["before"].items():
        key = k.replace("_dmp_wrapped_module.", "")
        torch.testing.assert_close(v, expected[key], rtol=0, atol=0, msg=k)
        changed += int(not torch.equal(v, out["fresh"][k]))
    assert changed > 0  # the checkpoint is not the fresh init
    moved = [k for k in out["before"] if not torch.equal(out["before"][k], out["after"][k])]
    assert any("encoder" in k for k in moved), moved
