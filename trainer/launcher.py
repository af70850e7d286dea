"""Starting the real ``deepspeed`` launcher: its command line, the environment of every rank, the
hostfile and environment file of a multi-node launch, and running it in the foreground.

Environment. Every rank needs the repository on ``PYTHONPATH``, ``OMP_NUM_THREADS`` (default 1),
``TORCH_EXTENSIONS_DIR`` (default ``<venv>/torch_extensions``, where DeepSpeed's CPU op was built
once) and, with ``--iface NAME``, the network interface for gloo and NCCL (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``). In (a) and (c) this command hands it to the launcher it starts on its node;
in (b) it also writes it to ``R/launch/deepspeed_env``, the ``.deepspeed_env`` file DeepSpeed's
runner exports on every host (``DS_ENV_FILE`` points it there). Paths (``features``, ``run``,
``--config``) are made absolute, and in (b) the launcher runs from the repository, the directory the
remote hosts ``cd`` into: the repository and the virtual environment must sit at the same path on
every node, and ``run`` on a filesystem they share.

The launcher's output streams through (into the file of a :func:`common.logs.output_to` block
when one is open, as in the demo's steps); its exit code is the command's (128 + S for a launcher
killed by signal S). SIGINT and SIGTERM are passed to the launcher's whole process group, so
stopping this command stops every rank it started; and if this command is killed outright
(SIGKILL), the group is stopped within seconds too (:mod:`common.concurrency`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Sequence

from common.concurrency import process_group
from common.config import to_yaml
from common.files import atomic_write_text
from common.logs import child_output
from common.repo import REPO_ROOT
from trainer.config import TrainConfig
from trainer.distributed import remove_leftover_segments

log = logging.getLogger(__name__)




TRAIN_SCRIPT = REPO_ROOT / "trainer" / "train.py"


DEFAULT_MASTER_PORT = 29500


LAUNCH_DIR = "launch"
"""``RUN_DIR/launch/``: the environment file, hostfile and resolved config a launch writes."""


ENV_FILE = "deepspeed_env"
RESOLVED_CONFIG = "train.yaml"


PROPAGATED = ("PYTHONPATH", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "GLOO_SOCKET_IFNAME",
              "NCCL_SOCKET_IFNAME")
"""The variables every rank on every node must get (those that are set)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def deepspeed_command(script: Path, nproc: int, master_port: int, config_file: str | None,
                      overrides: Sequence[str], *, nodes: int = 1, node_rank: int | None = None,
                      hostfile: Path | None = None, master_addr: str | None = None) -> list[str]:
    """The launcher command line: ``nproc`` ranks per node running ``script``; on one node unless
    a ``hostfile`` names the nodes, and with ``node_rank`` as one node of a launch without ssh."""
    command = [str(Path(sys.prefix) / "bin" / "deepspeed")]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile), "--num_nodes", str(nodes)]
    if node_rank is not None:
        command += ["--no_ssh", "--node_rank", str(node_rank)]
    command += ["--num_gpus", str(nproc)]
    if master_addr:
        command += ["--master_addr", master_addr]
    command += ["--master_port", str(master_port), str(script)]
    if config_file:
        command += ["--config", str(config_file)]
    return command + list(overrides)


def launch_env(base: dict[str, str] | None = None, iface: str | None = None) -> dict[str, str]:
    """The environment every rank needs, on top of ``base`` (default: this process's)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if iface:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = iface
    return env


def env_file_text(env: dict[str, str]) -> str:
    """``.deepspeed_env`` lines (``KEY=VALUE``) for the variables of :data:`PROPAGATED` that are set."""
    return "".join(f"{key}={env[key]}\n" for key in PROPAGATED if env.get(key))


def hostfile_text(nodes: int, nproc: int) -> str:
    """A hostfile for a launch without ssh: the names only label the nodes (node ``i`` is the one
    started with ``--node-rank i``); the slots tell every node the shape of the world."""
    return "".join(f"node{index} slots={nproc}\n" for index in range(nodes))


def hosts_in(hostfile: Path) -> list[str]:
    """The host names of a hostfile (``name slots=K`` lines; ``#`` comments and blank lines skipped)."""
    hosts = []
    for line in hostfile.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def pdsh_command(deepspeed_args: Sequence[str], env: dict[str, str], env_file: str) -> list[str]:
    """The command DeepSpeed's runner starts for a hostfile launch over pdsh, built by its own
    ``PDSHRunner`` with the same exports (``env``'s, then the ``env_file`` lines), for a dry run;
    ``deepspeed_args`` are the arguments after ``deepspeed``."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    args = runner.parse_args(list(deepspeed_args))
    pool = runner.fetch_hostfile(args.hostfile)
    active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    pdsh = runner.PDSHRunner(args, runner.encode_world_info(active))
    exported = runner.EXPORT_ENVS + get_accelerator().export_envs()
    for key, value in env.items():
        if any(key.startswith(prefix) for prefix in exported):
            pdsh.add_export(key, value)
    for line in env_file.splitlines():
        key, value = line.split("=", 1)
        pdsh.add_export(key, value)
    with contextlib.chdir(REPO_ROOT):
        command, _, _ = pdsh.get_cmd(dict(env), active)
    return command


def run_launcher(command: Sequence[str], env: dict[str, str], cwd: Path | None = None,
                 local_port: int | None = None, stdout: IO[str] | None = None) -> int:
    """Run a launcher command in the foreground in a process group of its own that dies with this
    process, passing SIGINT and SIGTERM to the whole group (:func:`common.concurrency.process_group`);
    returns its exit code (128 + S if a signal S ended it). ``local_port``: the master port of
    ranks started on this machine, whose shared-memory segments are swept afterwards
    (:func:`trainer.distributed.remove_leftover_segments`); ``stdout``: where the launcher's
    output goes (stderr too; default: the file of an open :func:`common.logs.output_to`, else
    this process's streams)."""
    log.info("running: %s", shlex.join(command))
    stdout = stdout if stdout is not None else child_output()
    streams = {} if stdout is None else {"stdout": stdout, "stderr": subprocess.STDOUT}
    try:
        with process_group(command, env=env, cwd=cwd, **streams) as process:
            code = process.wait()
    finally:
        if local_port is not None:
            remove_leftover_segments(local_port)
    return 128 - code if code < 0 else code


def run_deepspeed(script: Path, nproc: int, config_file: str | None, overrides: Sequence[str],
                  stdout: IO[str] | None = None) -> int:
    """Run the launcher for ``nproc`` ranks on this node in the foreground; returns its exit code."""
    port = free_port()
    return run_launcher(deepspeed_command(script, nproc, port, config_file, overrides), launch_env(),
                        local_port=port, stdout=stdout)


def run_with_config(script: Path, nproc: int, config: TrainConfig, arguments: Sequence[str] = (),
                    stdout: IO[str] | None = None) -> int:
    """Run ``script`` on ``nproc`` local ranks with ``config`` as the whole of their configuration.

    The caller builds ``config`` from typed values; it is written, resolved, to
    ``RUN/launch/train.yaml`` (:data:`RESOLVED_CONFIG`), which every rank loads, so what a run
    trained with is on record beside it. ``arguments`` are the script's own options."""
    config_file = Path(config.run) / LAUNCH_DIR / RESOLVED_CONFIG
    atomic_write_text(config_file, to_yaml(config))
    return run_deepspeed(script, nproc, str(config_file), arguments, stdout=stdout)
