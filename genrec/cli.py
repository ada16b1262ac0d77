"""`genrec` command line: one verb per phase of the flow.

    genrec generate | prepare | plan | train | evaluate | export | serve | predict | plot
    genrec quickstart
    genrec config show CONFIG [a.b=c ...]
    genrec env | --version

Each verb parses its arguments here and calls one function of the package that owns the
phase; heavy imports (torch, ray) happen only inside the verb that needs them. CONFIG is a
YAML path or the name of a shipped config (`genrec train tecd`).

Expected failures (a missing file or checkpoint, a bad config, bad data, a port in use)
print one line, `genrec: error: PROBLEM. Fix: ...`, and exit 2; `--debug` (anywhere on
the command line) shows the traceback instead. Anything else is a bug and raises.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import socket
import sys
from pathlib import Path

from genrec import __version__
from genrec.config import ConfigError, dump_config, load_config

EXIT_EXPECTED = 2  # what argparse uses for usage errors


class CliError(Exception):
    """An expected failure found by the CLI itself: the message names problem and fix."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, or a shipped config's name (tecd, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.batch_size=64")


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from importlib import metadata

    print(f"python          {platform.python_version()} ({sys.executable})")
    for dist in ("torch", "torchrec", "fbgemm_gpu-cpu", "fbgemm_gpu", "ray", "pyarrow", "triton"):
        try:
            print(f"{dist:<16}{metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    print(f"cpus            {os.cpu_count()}")
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}      {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("devices         cpu only (no CUDA device visible)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from genrec.data_pipeline.synthetic import generate

    report = generate(
        source=args.source,
        out_dir=args.out,
        users=args.users,
        events=args.events,
        items=args.items,
        seed=args.seed,
    )
    print(report.summary())
    return 0


def prepare_source(args: argparse.Namespace) -> str:
    """The source name prepare takes; `parquet` carries its column mapping from --config."""
    if args.source != "parquet":
        return args.source
    if not args.config:
        raise CliError(
            "--source parquet needs its column mapping. Fix: pass --config CONFIG whose "
            "data.parquet names your columns (README: Your own data)"
        )
    from genrec.data_pipeline.sources import source_spec

    return source_spec(load_config(args.config).data.parquet)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from genrec.data_pipeline.sequences import prepare

    report = prepare(
        source=prepare_source(args),
        in_dir=args.in_dir,
        out_dir=args.out,
        window=args.window,
        max_len=args.max_len,
        on_bad_rows=args.on_bad_rows,
        ray_address=args.ray_address,
        task_mb=args.task_mb,
        files_per_window=args.files_per_window,
        row_group_rows=args.row_group_rows,
        append=args.append,
    )
    print(report.summary())
    if args.vocab_min_count > 0:
        from genrec.data_pipeline.vocabulary import write_item_vocabulary

        v = write_item_vocabulary(args.out, args.vocab_min_count, args.vocab_overflow_rows)
        print(f"item vocabulary: {v.ids.size:,} ids + {v.overflow_rows:,} overflow rows")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from genrec.sharding_plans.planner import plan_command

    cfg = load_config(args.config, args.overrides)
    return plan_command(cfg, save=args.save, events=args.events, tokens_per_s=args.tokens_per_s)


def check_prepared(cfg) -> None:
    """Fail here, in one line, rather than inside every spawned rank: the prepared data
    must exist. Skipped for a Ray cluster's workers, whose storage this host may not see."""
    if cfg.trainer.launcher == "ray" and cfg.data.ray_address:
        return
    catalog = Path(cfg.data.prepared_dir) / "items.parquet"
    if not catalog.is_file():
        raise CliError(
            f"{cfg.data.prepared_dir}: no prepared data ({catalog.name} missing). Fix: run "
            f"genrec prepare --out {cfg.data.prepared_dir}, or set data.prepared_dir"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from genrec.trainer.launch import train

    cfg = load_config(args.config, args.overrides)
    if args.launcher:
        cfg.trainer.launcher = args.launcher
    if args.ray_address:
        cfg.data.ray_address = args.ray_address
    if args.init_from:
        cfg.trainer.init_from = args.init_from
    check_prepared(cfg)
    train(cfg, resume=not args.no_resume)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from genrec.trainer.launch import evaluate

    cfg = load_config(args.config, args.overrides)
    if args.launcher:
        cfg.trainer.launcher = args.launcher
    result = evaluate(cfg, args.checkpoint or None, args.split, args.out or None)
    if not result:  # a torchrun rank other than 0
        return 0
    from genrec.trainer.evaluate import describe_result

    for line in describe_result(result):
        print(line, file=sys.stderr)
    print(f"checkpoint {result['checkpoint']} (step {result['step']})", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from genrec.semantic.tokenize import summary, tokenize

    for line in summary(tokenize(load_config(args.config, args.overrides))):
        print(line)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from genrec.trainer.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from genrec.deploy.export import export

    weights = {t: float(w) for t, w in (x.split("=") for x in args.rerank_weights.split(",") if x)}
    manifest = export(
        args.checkpoint,
        args.out,
        compile_aot=not args.no_aot,
        ranker=args.ranker or None,
        rerank_weights=weights or None,
    )
    print(f"artifact written to {args.out} ({len(manifest['files'])} files)")
    return 0


def serve_address(args: argparse.Namespace) -> tuple[str, int]:
    """host, port: the flags, else the config's deploy section (--config CONFIG with
    overrides, else the config the artifact was exported with)."""
    if args.config:
        deploy = load_config(args.config, args.overrides).deploy
    else:
        from genrec.config import apply_overrides, from_dict
        from genrec.deploy.artifact import read_manifest

        stored = read_manifest(args.artifact, verify=False)["config"]
        deploy = from_dict(apply_overrides(stored, args.overrides)).deploy
    return (args.host or deploy.host, args.port if args.port is not None else deploy.port)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise CliError(
                f"port {port} on {host} is in use. Fix: stop what listens there, or pass "
                f"--port N (or set deploy.port)"
            ) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    host, port = serve_address(args)
    check_port_free(host, port)
    from genrec.deploy.serve import serve

    serve(args.artifact, host=host, port=port, blocking=True)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from genrec.deploy.predict import predict

    cfg = load_config(args.config, args.overrides)
    report = predict(
        cfg,
        checkpoint=args.checkpoint,
        users=args.users,
        out=args.out,
        k=args.k,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    print(report.summary())
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from genrec.trainer.quickstart import quickstart

    return quickstart(workdir=args.workdir, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genrec",
        description="Train HSTU generative recommenders on TorchRec-sharded tables, "
        "streamed from Parquet by Ray, and serve them.",
    )
    parser.add_argument("--version", action="version", version=f"genrec {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of expected errors too"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="show a resolved config")
    csub = p.add_subparsers(dest="config_command", required=True)
    ps = csub.add_parser("show", help="print the config after overrides")
    _add_config_args(ps)
    ps.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("env", help="versions of python, torch, torchrec, fbgemm, ray; devices")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("generate", help="write synthetic data in a source's own layout")
    p.add_argument("--source", required=True, choices=["tecd", "vk_lsvd", "yambda"])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("prepare", help="Ray job: events -> per-user sequence shards by window")
    p.add_argument(
        "--source",
        required=True,
        choices=["tecd", "vk_lsvd", "yambda", "text", "recbole", "parquet"],
    )
    p.add_argument("--config", default="", help="--source parquet: its data.parquet mapping")
    p.add_argument("--in", dest="in_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--window", default="day", help="day | week | a number of seconds")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    p.add_argument("--ray-address", default="")
    p.add_argument("--task-mb", type=float, default=512, help="memory per task (sets buckets)")
    p.add_argument("--files-per-window", type=int, default=4, help="most files per window")
    p.add_argument(
        "--row-group-rows", type=int, default=64, help="rows per row group (divides batch size)"
    )
    p.add_argument("--append", action="store_true", help="add new days (--in) to an existing --out")
    p.add_argument(
        "--vocab-min-count", type=int, default=0, help="write vocab/item_id.parquet (0: none)"
    )
    p.add_argument("--vocab-overflow-rows", type=int, default=1024)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "plan",
        help="print (and save) the sharding plan, memory per rank and the time model "
        "(activations, all-to-all bytes, hours per pass: estimates)",
    )
    _add_config_args(p)
    p.add_argument("--save", default="", help="write the plan to this file")
    p.add_argument(
        "--events",
        type=int,
        default=0,
        help="events in one pass (default: data.prepared_dir's _meta.json, if there)",
    )
    p.add_argument(
        "--tokens-per-s",
        type=float,
        default=0.0,
        help="training tokens/s per GPU for the hours estimate (default: the measured "
        "H100 HSTU encoder figure of benchmarks/RESULTS.md, scaled to model.num_layers)",
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("train", help="one-pass streaming (or multi-epoch) training")
    _add_config_args(p)
    p.add_argument("--launcher", choices=["local", "torchrun", "ray"], default=None)
    p.add_argument("--ray-address", default="")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in run_dir")
    p.add_argument(
        "--init-from", default="", help="warm start from this checkpoint's model weights"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="score a checkpoint without training: leave-one-out valid/test (epochs mode) "
        "or each of data.windows with frozen weights (stream mode)",
    )
    _add_config_args(p)
    p.add_argument("--checkpoint", default="", help="default: the newest in trainer.run_dir")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="epochs mode")
    p.add_argument("--out", default="", help="result JSON (default: in trainer.run_dir)")
    p.add_argument("--launcher", choices=["local", "torchrun"], default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "tokenize", help="semantic IDs: item vectors -> codes + stats (the semantic section)"
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("plot", help="write PNG curves of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("export", help="checkpoint -> serving artifact (AOTInductor + index)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--no-aot", action="store_true", help="skip AOTInductor compilation")
    p.add_argument("--ranker", default="", help="a ranking checkpoint to pair (rerank: N)")
    p.add_argument("--rerank-weights", default="", help="task=weight,... (default: 1st task)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="HTTP endpoint over an exported artifact")
    p.add_argument("artifact")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deploy.port=9000")
    p.add_argument(
        "--config", default="", help="take deploy.* from this config (default: the artifact's)"
    )
    p.add_argument("--host", default=None, help="default: the config's deploy.host")
    p.add_argument("--port", type=int, default=None, help="default: the config's deploy.port")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "predict", help="Ray Data batch job: top-k recommendations for users -> Parquet"
    )
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="an exported artifact, a checkpoint, or a run directory (its latest checkpoint)",
    )
    p.add_argument(
        "--users",
        required=True,
        help="Parquet with user_id (and optionally history: list<int64>); users without a "
        "history column get their latest prepared window from data.prepared_dir",
    )
    p.add_argument("--out", required=True, help="output Parquet: user_id, item_ids, scores")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="users per model call")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one model each")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("quickstart", help="generate, prepare, train on 2 ranks, evaluate, plot")
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def expected_error(e: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which raises)."""
    e = getattr(e, "cause", None) or e  # a Ray task's error carries the original as .cause
    if isinstance(e, ConfigError):
        fix = "" if "Fix:" in str(e) else ". Fix: correct that key in the file or the override"
        return f"config: {e}{fix}"
    if isinstance(e, CliError):
        return str(e)
    for module, name in (
        ("genrec.data_pipeline.validation", "DataError"),
        ("genrec.deploy.artifact", "ArtifactError"),
        ("genrec.deploy.predict", "PredictError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)  # loaded if it was raised
        if cls is not None and isinstance(e, cls):
            return str(e)
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        if e.filename is None:  # raised by genrec with its own message and fix
            return str(e)
        return f"{e.filename}: {e.strerror}. Fix: check the path"
    if isinstance(e, PermissionError):
        return f"{e.filename}: permission denied. Fix: choose a path you can write"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        message = expected_error(e)
        if message is None or debug:
            raise
        one_line = " ".join(message.split())  # --debug shows the traceback
        print(f"genrec: error: {one_line}", file=sys.stderr)
        return EXIT_EXPECTED


if __name__ == "__main__":
    sys.exit(main())
