"""``sirenfeed train``: start the real ``deepspeed`` launcher on ``trainer/train.py``, on one node or many.

One command, three ways to place the ranks (``docs/multinode.md`` has the recipes):

(a) one node, ``N`` local ranks::

        sirenfeed train --features F --run R --nproc N
        → deepspeed --num_gpus N --master_port PORT <repo>/trainer/train.py ... features=F run=R

(b) ``N`` nodes over ssh/pdsh from a hostfile, DeepSpeed's own way (run it on the first host)::

        sirenfeed train --hostfile HOSTS --nodes N --nproc K [--master ADDR:PORT] ...
        → DS_ENV_FILE=R/launch/deepspeed_env deepspeed --hostfile HOSTS --num_nodes N --num_gpus K ...

(c) ``N`` nodes without ssh, one command per node, as schedulers (Kubernetes, SLURM) start them::

        sirenfeed train --nodes N --node-rank I --master ADDR:PORT --nproc K ...
        → deepspeed --hostfile R/launch/hostfile.nodeI --num_nodes N --no_ssh --node_rank I --num_gpus K
              --master_addr ADDR --master_port PORT ...

``--dry-run`` prints what would run and exits; for (b) that includes the pdsh command DeepSpeed's
runner would start on the hosts (built by DeepSpeed's own ``PDSHRunner``).

Environment. Every rank needs the repository on ``PYTHONPATH``, ``OMP_NUM_THREADS`` (default 1),
``TORCH_EXTENSIONS_DIR`` (default ``<venv>/torch_extensions``, where DeepSpeed's CPU op was built
once) and, with ``--iface NAME``, the network interface for gloo and NCCL (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``). In (a) and (c) this command hands it to the launcher it starts on its node;
in (b) it also writes it to ``R/launch/deepspeed_env``, the ``.deepspeed_env`` file DeepSpeed's
runner exports on every host (``DS_ENV_FILE`` points it there). Paths (``features``, ``run``,
``--config``) are made absolute, and in (b) the launcher runs from the repository, the directory the
remote hosts ``cd`` into: the repository and the virtual environment must sit at the same path on
every node, and ``run`` on a filesystem they share.

The launcher's output streams through; its exit code is the command's (128 + S for a launcher
killed by signal S). SIGINT and SIGTERM are passed to the launcher's whole process group, so
stopping this command stops every rank it started; and if this command is killed outright
(SIGKILL), the group is stopped within seconds too (:mod:`common.concurrency`).
"""

from __future__ import annotations

import argparse
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
from common.config import add_config_arguments, config_from_args
from common.logs import DATE_FORMAT
from features.dataset import atomic_write_text
from trainer.config import TrainConfig
from trainer.distributed import remove_leftover_segments

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "trainer" / "train.py"
DEFAULT_MASTER_PORT = 29500
LAUNCH_DIR = "launch"
"""``RUN_DIR/launch/``: the environment file and hostfile a launch writes."""
ENV_FILE = "deepspeed_env"
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
    output goes (stderr too; default: this process's streams)."""
    log.info("running: %s", shlex.join(command))
    streams = {} if stdout is None else {"stdout": stdout, "stderr": subprocess.STDOUT}
    try:
        with process_group(command, env=env, cwd=cwd, **streams) as process:
            code = process.wait()
    finally:
        if local_port is not None:
            remove_leftover_segments(local_port)
    return 128 - code if code < 0 else code


def run_deepspeed(script: Path, nproc: int, config_file: str | None, overrides: Sequence[str]) -> int:
    """Run the launcher for ``nproc`` ranks on this node in the foreground; returns its exit code."""
    port = free_port()
    return run_launcher(deepspeed_command(script, nproc, port, config_file, overrides), launch_env(),
                        local_port=port)


def configure_logging(rank: int) -> None:
    """Logging inside a launched rank: rank 0 at INFO, the others at WARNING, each line tagged with
    the rank. DeepSpeed's and Petastorm's INFO chatter is held back so our progress lines stay
    readable."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
                        datefmt=DATE_FORMAT, force=True)
    for noisy in ("DeepSpeed", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sirenfeed train",
        description="Train the ranker through the deepspeed launcher: local ranks, a hostfile over "
                    "ssh/pdsh, or one node of a launch without ssh.",
        epilog="`sirenfeed train --continuous --config conf/retrain.yaml` keeps training on new data "
               "as it lands (see `sirenfeed train --continuous --help`).")
    parser.add_argument("--features", help="feature dataset directory (config key features)")
    parser.add_argument("--run", help="run directory (config key run)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per node (default 2)")
    parser.add_argument("--nodes", type=int, help="nodes (default: 1, or every host of --hostfile)")
    parser.add_argument("--node-rank", type=int, help="this node's index in a launch without ssh")
    parser.add_argument("--master", metavar="ADDR:PORT",
                        help="node 0's address and a port free there (required with --node-rank)")
    parser.add_argument("--hostfile", type=Path,
                        help="DeepSpeed hostfile ('HOST slots=K' lines): launch over ssh/pdsh from "
                             "here, or with --node-rank name the nodes of a launch without ssh")
    parser.add_argument("--iface", help="network interface for gloo and NCCL on every node (e.g. eth0)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; start nothing")
    parser.add_argument("--resume-from", metavar="latest|RUN_DIR",
                        help="warm start: continue this checkpoint on the newer feature batches only "
                             "(trainer.warm_start; 'latest' = RUN_DIR's own)")
    parser.add_argument("--since-watermark", default="auto", metavar="auto|BATCH",
                        help="with --resume-from: the feature batch the checkpoint was trained "
                             "through (auto: from its client state)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    master_addr, master_port = _master(parser, args.master)
    hosts = hosts_in(args.hostfile) if args.hostfile else []
    nodes = args.nodes or len(hosts) or 1
    _check_topology(parser, args, nodes, hosts, master_addr)
    # Fail on a bad config here, before the launcher starts N processes that would all fail.
    config = config_from_args(TrainConfig, args, features=args.features, run=args.run)
    if args.resume_from:
        from trainer import continual  # warm starts build on this module

        continual.check_continual(config)
        return continual.launch(config.features, config.run, args.resume_from, args.since_watermark,
                                args.nproc, args.config, list(args.overrides))

    run_dir = Path(_absolute(config.run))
    overrides = [*args.overrides, f"features={_absolute(config.features)}", f"run={run_dir}"]
    env = launch_env(iface=args.iface)
    files: dict[Path, str] = {}
    over_ssh = nodes > 1 and args.node_rank is None
    hostfile = None
    if args.hostfile and (over_ssh or args.node_rank is not None):  # one node alone: a local launch
        hostfile = Path(_absolute(str(args.hostfile)))
    if args.node_rank is not None and hostfile is None:
        hostfile = run_dir / LAUNCH_DIR / f"hostfile.node{args.node_rank}"
        files[hostfile] = hostfile_text(nodes, args.nproc)
    if over_ssh:
        env_file = run_dir / LAUNCH_DIR / ENV_FILE
        files[env_file] = env_file_text(env)
        env["DS_ENV_FILE"] = str(env_file)
    if master_addr is None and not over_ssh:
        master_port = free_port()  # one node: any free local port
    command = deepspeed_command(TRAIN_SCRIPT, args.nproc, master_port,
                                _absolute(args.config) if args.config else None, overrides,
                                nodes=nodes, node_rank=args.node_rank, hostfile=hostfile,
                                master_addr=master_addr)
    if args.dry_run:
        _print_plan(command, env, files, hosts, over_ssh)
        return 0
    for path, text in files.items():
        atomic_write_text(path, text)
    return run_launcher(command, env, cwd=REPO_ROOT if over_ssh else None,
                        local_port=None if over_ssh else master_port)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _master(parser: argparse.ArgumentParser, value: str | None) -> tuple[str | None, int]:
    if value is None:
        return None, DEFAULT_MASTER_PORT
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--master must look like ADDR:PORT, got {value!r}")
    return host, int(port)


def _check_topology(parser: argparse.ArgumentParser, args: argparse.Namespace, nodes: int,
                    hosts: list[str], master_addr: str | None) -> None:
    if args.hostfile and not hosts:
        parser.error(f"--hostfile {args.hostfile} names no host")
    if args.nproc < 1 or nodes < 1:
        parser.error("--nproc and --nodes must be >= 1")
    if hosts and nodes > len(hosts):
        parser.error(f"--nodes {nodes} but --hostfile {args.hostfile} names {len(hosts)} host(s)")
    if args.node_rank is not None:
        if not 0 <= args.node_rank < nodes:
            parser.error(f"--node-rank must be in [0, {nodes}) for --nodes {nodes}")
        if master_addr is None:
            parser.error("--node-rank needs --master ADDR:PORT (node 0's address, a port free there)")
    elif nodes > 1 and not hosts:
        parser.error("several nodes need --hostfile (launch over ssh/pdsh) or --node-rank and "
                     "--master (one command per node, no ssh)")


def _print_plan(command: list[str], env: dict[str, str], files: dict[Path, str], hosts: list[str],
                over_ssh: bool) -> None:
    """The dry run's report (this command's only stdout)."""
    for path, text in files.items():
        print(f"# {path}")
        print(text, end="")
    if not over_ssh:
        print("# environment of every rank")
        print(env_file_text(env), end="")
    print("# launcher")
    print(shlex.join([f"DS_ENV_FILE={env['DS_ENV_FILE']}", *command] if over_ssh else command))
    if over_ssh:
        arguments = command[1:]
        if "--master_addr" not in arguments:  # DeepSpeed would ask the first host (ssh hostname -I)
            arguments = ["--master_addr", hosts[0], *arguments]
        env_file = next(text for path, text in files.items() if path.name == ENV_FILE)
        print("# what the launcher starts on the hosts over pdsh")
        print(shlex.join(pdsh_command(arguments, env, env_file)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
