"""Static checks of the GPU image and cluster specs (no Docker engine, no cluster here).

The Dockerfile is parsed instruction by instruction; its pins are checked against
requirements.lock; the commands in the manifests and the README are parsed by genrec's own
CLI parser and config loader; the `ray up` file is validated by Ray's own schema.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """[(INSTRUCTION, arguments, first line)]; comments dropped, continuations joined."""
    out: list[tuple[str, str, int]] = []
    pending, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation
            continue
        if not pending:
            start = lineno
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        m = re.match(r"([A-Za-z]+)\s+(.*)", full, re.S)
        if not m:
            raise ValueError(f"Dockerfile line {start}: cannot parse {full!r}")
        instr = m.group(1).upper()
        if instr not in KNOWN_INSTRUCTIONS:
            raise ValueError(f"Dockerfile line {start}: unknown instruction {instr}")
        out.append((instr, m.group(2).strip(), start))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def expand_args(instructions: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Substitute ${NAME} / $NAME of ARG defaults (in order, as the builder does)."""
    values: dict[str, str] = {}
    out = []
    for instr, args, line in instructions:
        expanded = re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
            args,
        )
        if instr == "ARG" and "=" in expanded:
            name, default = expanded.split("=", 1)
            values[name.strip()] = default.strip()
        out.append((instr, expanded, line))
    return out


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, |), each as its words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    cmds: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            cmds.append([])
        else:
            cmds[-1].append(token)
    return [c for c in cmds if c]


def read_lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str, int]]:
    return expand_args(parse_dockerfile((DOCKER / "Dockerfile").read_text()))


def test_parser_rejects_broken_dockerfiles():
    with pytest.raises(ValueError, match="unknown instruction FORM"):
        parse_dockerfile("FORM ubuntu\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM ubuntu\nRUN echo \\\n")
    parsed = parse_dockerfile("# c\nFROM a\nRUN x \\\n  # note\n  && y\n")
    assert parsed == [("FROM", "a", 2), ("RUN", "x && y", 3)]


def test_dockerfile_is_a_cuda_python311_image(dockerfile):
    instrs = [i for i, _, _ in dockerfile]
    assert instrs[: instrs.index("FROM") + 1].count("FROM") == 1
    assert all(i == "ARG" for i in instrs[: instrs.index("FROM")]), "FROM must come first"
    base = next(a for i, a, _ in dockerfile if i == "FROM")
    m = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?(?:runtime|devel)-ubuntu[\d.]+", base
    )
    assert m, f"base image {base!r} is not an nvidia/cuda runtime/devel Ubuntu image"
    cuda_tag = next(a for i, a, _ in dockerfile if i == "ARG" and a.startswith("CUDA_TAG="))
    assert cuda_tag == f"CUDA_TAG=cu{m.group(1)}{m.group(2)}", "wheel index CUDA != base CUDA"
    runs = " ".join(a for i, a, _ in dockerfile if i == "RUN")
    assert "python3.11 -m venv" in runs


def test_every_pin_matches_requirements_lock(dockerfile):
    lock = read_lock()
    runs = [a for i, a, _ in dockerfile if i == "RUN"]
    pins = {}
    for cmd in runs:
        for words in shell_commands(cmd):
            if words[:2] == ["pip", "install"]:
                for w in words[2:]:
                    if "==" in w:
                        name, version = w.split("==")
                        pins[name.lower().replace("_", "-")] = (version, " ".join(words))
    assert pins["torch"][0] == lock["torch"]
    assert pins["fbgemm-gpu"][0] == lock["fbgemm-gpu-cpu"]
    for name in ("torch", "fbgemm-gpu"):
        assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu12\d", pins[name][1])
    for name, (version, _) in pins.items():
        if name not in ("torch", "fbgemm-gpu"):
            assert lock.get(name) == version, f"Dockerfile pins {name}=={version}, lock differs"
    # the lock itself is installed, minus exactly the two packages the CUDA builds replace
    assert ("COPY", "requirements.lock ./requirements.lock") in [(i, a) for i, a, _ in dockerfile]
    install = next(c for c in runs if "requirements.lock" in c and "pip install" in c)
    m = re.search(
        r"sed '/\^([^/]+)/,\$d' requirements\.lock \| grep -v -E '([^']+)' > (\S+)", install
    )
    assert m and f"pip install --no-deps -r {m.group(3)}" in install
    raw = (ROOT / "requirements.lock").read_text().splitlines()
    # sed: from the first line starting with the dev section's header on, dropped
    runtime = raw[: next(i for i, line in enumerate(raw) if line.startswith(m.group(1)))]
    pins = [line for line in runtime if line.strip() and not line.startswith("#")]
    kept = [line for line in pins if not re.search(m.group(2), line)]
    dropped = sorted(set(pins) - set(kept))
    assert dropped == [f"fbgemm_gpu-cpu=={lock['fbgemm-gpu-cpu']}", f"torch=={lock['torch']}"]
    names = {k.split("==")[0] for k in kept}
    assert {"torchrec", "ray", "pyarrow", "fastapi"} <= names
    assert not {"pytest", "ruff"} & names, "test and lint tools must not go into the image"


def test_entrypoint_is_the_genrec_cli_and_copies_exist(dockerfile):
    entry = [a for i, a, _ in dockerfile if i == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["genrec"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^genrec = "genrec\.cli:main"$', pyproject, re.M)
    runs = [a for i, a, _ in dockerfile if i == "RUN"]
    install = next(a for a in runs if "pip install --no-deps --no-build-isolation ." in a)
    # configs are package data: found by name from outside the sources, as from a wheel
    cmds = shell_commands(install)
    after_cd = cmds[[c[0] for c in cmds].index("cd") :]
    assert after_cd[0] == ["cd", "/"] and ["genrec", "config", "show", "quickstart", ">"] in [
        c[:5] for c in after_cd
    ]
    assert not (ROOT / "configs").exists(), "configs live in genrec/configs (package data)"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for instr, args, line in dockerfile:
        if instr == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"Dockerfile line {line}: COPY source {src} missing"
                assert f"!{src}" in ignore, f"{src} is excluded from the build context"


def _train_args(command: list[str]):
    from genrec.cli import build_parser
    from genrec.config import load_config

    assert command[0] == "genrec", command
    args = build_parser().parse_args(command[1:])
    assert args.command == "train"
    # the overrides must be valid keys and values of the config tree (the named file's own
    # existence is test_launch_commands_name_configs_that_exist)
    return args, load_config(None, args.overrides)


def launch_commands() -> list[list[str]]:
    """Every `genrec train` command line of the manifests and the README, as words."""
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    cmds = [shlex.split(job["spec"]["entrypoint"])]
    for c in readme_commands():
        words = shlex.split(c)
        if "train" in words:
            start = words.index("train")
            cmds.append(["genrec", *words[start:]])
    return cmds


def test_launch_commands_name_configs_that_exist():
    from genrec.cli import build_parser
    from genrec.config import resolve_config

    cmds = launch_commands()
    assert len(cmds) == 4  # rayjob, docker run (local), torchrun, ray job submit
    for words in cmds:
        args = build_parser().parse_args(words[1:])
        assert resolve_config(args.config).is_file(), f"{' '.join(words)}: no {args.config}"


def test_rayjob_runs_genrec_train_on_as_many_gpus_as_ranks():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    args, cfg = _train_args(shlex.split(job["spec"]["entrypoint"]))
    assert (args.launcher, args.ray_address) == ("ray", "auto")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == read_lock()["ray"]
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
    assert gpus == cfg.trainer.world_size == cfg.sharding.topology.world_size == 16
    assert cfg.sharding.topology.device == "cuda"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_ray_up_cluster_passes_rays_schema_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    types = cluster["available_node_types"]
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and cluster["head_node_type"] not in gpu_types
    total_gpus = sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    docker = cluster["docker"]
    assert docker["image"] and '--entrypoint=""' in docker["run_options"]  # image runs genrec
    assert "--gpus all" in docker["worker_run_options"]
    submit = next(c for c in readme_commands() if c.startswith("ray job submit"))
    args, cfg = _train_args(shlex.split(submit.split(" -- ", 1)[1]))
    assert (args.launcher, args.ray_address) == ("ray", "auto")
    assert cfg.trainer.world_size == cfg.sharding.topology.world_size == total_gpus == 16


def readme_commands() -> list[str]:
    """Shell commands in the README's ```bash blocks, continuations joined."""
    text = (DOCKER / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        cmds += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return cmds


def test_readme_commands_build_run_and_launch_every_way():
    cmds = readme_commands()
    assert "docker build -f docker/Dockerfile -t genrec:cu128 ." in cmds
    assert "ray up docker/ray-cluster.yaml" in cmds
    assert "kubectl apply -f docker/rayjob.yaml" in cmds
    local = next(c for c in cmds if c.startswith("docker run") and " train " in c)
    words = shlex.split(local)
    assert "--gpus" in words and words[words.index("--gpus") + 1] == "all"
    args, cfg = _train_args(["genrec", *words[words.index("genrec:cu128") + 1 :]])
    assert args.launcher == "local" and cfg.sharding.topology.device == "cuda"
    torchrun = shlex.split(next(c for c in cmds if "--entrypoint torchrun" in c))
    opts = torchrun[torchrun.index("genrec:cu128") + 1 : torchrun.index("-m")]
    flags = dict(zip(opts[::2], opts[1::2], strict=True))
    assert flags["--rdzv-backend"] == "c10d" and flags["--rdzv-endpoint"]
    args, cfg = _train_args(["genrec", *torchrun[torchrun.index("genrec.cli") + 1 :]])
    assert args.launcher == "torchrun"
    assert int(flags["--nnodes"]) * int(flags["--nproc-per-node"]) == cfg.trainer.world_size
    assert int(flags["--nnodes"]) == cfg.sharding.topology.hosts
