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

The launcher itself is :mod:`trainer.launcher`, which says what every rank's environment gets.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from common.config import add_config_arguments, config_from_args
from common.files import atomic_write_text
from common.repo import REPO_ROOT
from trainer.config import TrainConfig
from trainer.launcher import (
    DEFAULT_MASTER_PORT, ENV_FILE, LAUNCH_DIR, TRAIN_SCRIPT, deepspeed_command, env_file_text,
    free_port, hostfile_text, hosts_in, launch_env, pdsh_command, run_launcher,
)

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sirenfeed train",
        description="Train the ranker through the deepspeed launcher: local ranks, a hostfile over "
                    "ssh/pdsh, or one node of a launch without ssh.",
        epilog="`sirenfeed train --resume-from latest|RUN_DIR` continues a checkpoint on the newer "
               "feature batches only (see `sirenfeed train --resume-from X --help`); "
               "`sirenfeed train --continuous --config conf/retrain.yaml` keeps training on new data "
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
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    master_addr, master_port = _master(parser, args.master)
    hosts = hosts_in(args.hostfile) if args.hostfile else []
    nodes = args.nodes or len(hosts) or 1
    _check_topology(parser, args, nodes, hosts, master_addr)
    # Fail on a bad config here, before the launcher starts N processes that would all fail.
    config = config_from_args(TrainConfig, args, features=args.features, run=args.run)
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
