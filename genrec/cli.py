"""`genrec` command line: one verb per phase of the flow.

    genrec generate | prepare | plan | train | evaluate | export | serve | plot | quickstart
    genrec config show CONFIG [a.b=c ...]
    genrec env

Each verb parses its arguments here and calls one function of the package that owns the
phase; heavy imports (torch, ray) happen only inside the verb that needs them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from genrec.config import ConfigError, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (configs/*.yaml)")
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


def _cmd_prepare(args: argparse.Namespace) -> int:
    from genrec.data_pipeline.sequences import prepare

    report = prepare(
        source=args.source,
        in_dir=args.in_dir,
        out_dir=args.out,
        window=args.window,
        max_len=args.max_len,
        on_bad_rows=args.on_bad_rows,
        ray_address=args.ray_address,
    )
    print(report.summary())
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from genrec.sharding_plans.planner import plan_command

    cfg = load_config(args.config, args.overrides)
    return plan_command(cfg, save=args.save, events=args.events, tokens_per_s=args.tokens_per_s)


def _cmd_train(args: argparse.Namespace) -> int:
    from genrec.trainer.launch import train

    cfg = load_config(args.config, args.overrides)
    if args.launcher:
        cfg.trainer.launcher = args.launcher
    if args.ray_address:
        cfg.data.ray_address = args.ray_address
    if args.init_from:
        cfg.trainer.init_from = args.init_from
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from genrec.deploy.serve import serve

    serve(args.artifact, host=args.host, port=args.port, blocking=True)
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
        "--source", required=True, choices=["tecd", "vk_lsvd", "yambda", "text", "recbole"]
    )
    p.add_argument("--in", dest="in_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--window", default="day", help="day | week | a number of seconds")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    p.add_argument("--ray-address", default="")
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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("quickstart", help="generate, prepare, train on 2 ranks, evaluate, plot")
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"genrec: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
