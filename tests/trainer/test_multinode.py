"""Multi-node training on this machine: two real ``deepspeed --no_ssh`` launchers on 127.0.0.1 that
train as one world (disjoint shards, identical replicas after every step, the global batches of a
single rank), a rank SIGKILLed mid-run (every node exits non-zero in bounded time, nothing left
running, the last complete checkpoint intact), the watchdog protocol over a real TCP store, and the
launch recipes (ssh/pdsh checked by a dry run)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from common.files import local_path
from common.repo import REPO_ROOT
from features.spec import FeatureSpec
from trainer.checkpoint import (
    COMPLETE_MARKER, LATEST, checkpoint_root, complete_tags, weights_only_loads,
)
from trainer.data import TrainStream, real_rows, row_fingerprints
from trainer.launch import main as train_main
from trainer.launcher import (
    ENV_FILE, LAUNCH_DIR, TRAIN_SCRIPT, deepspeed_command, env_file_text, launch_env,
)
from trainer.watchdog import EXIT_PEER_FAILED, STORE_PREFIX, Watchdog

HEARTBEAT_TIMEOUT_S = 10
STEPS, BATCH, CHECKPOINT_EVERY, KILL_AT = 10, 16, 5, 7


def process_table() -> dict[int, tuple[int, str]]:
    """``pid → (parent pid, state)`` of every process on the machine, from ``/proc``."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        state, parent = text[text.rindex(")") + 2:].split()[:2]  # after the command name
        table[int(stat.parent.name)] = (int(parent), state)
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int, marker: str = "") -> bool:
    """Whether ``pid`` is alive (not a zombie) and, if ``marker`` is given, still the process whose
    command line holds it (not an unrelated one that reused the pid)."""
    entry = process_table().get(pid)
    if entry is None or entry[1] == "Z":
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_group_features(feature_writer, tmp_path_factory) -> Path:
    """One row group in each split: fewer than the two ranks, so they split its rows."""
    return feature_writer(tmp_path_factory.mktemp("one-group"), train_files=[(0, 40, 40)],
                          eval_files=[(3, 16, 16)], seed=2)


def run_overrides(tiny_model_overrides, *extra: str) -> list[str]:
    return [*tiny_model_overrides, f"data.batch_size={BATCH}", "data.shuffle_buffer=16",
            "data.eval_batch_size=16", f"train.steps={STEPS}", "train.log_every=5",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_checkpoints=3",
            "schedule.warmup_steps=2", "optim.lr=0.02", "deepspeed.zero_stage=1",
            f"distributed.heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}", "distributed.timeout_s=120", *extra]


@dataclasses.dataclass
class NodeRuns:
    """Two ``sirenfeed train --node-rank i`` commands started side by side."""

    run: Path
    codes: list[int]
    outputs: list[str]
    ended: list[float]
    """Seconds from the start until each node's command exited."""
    pids: set[int]
    """Every process seen under either command while it ran."""


@dataclasses.dataclass(frozen=True)
class Network:
    """Where the two nodes run: the master's address, and per node a command prefix and interface."""
    master: str
    prefixes: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    ifaces: tuple[str, str] = ("lo", "lo")


def launch_two_nodes(features: Path, run: Path, overrides: list[str], hostfile: Path | None = None,
                     timeout: float = 300, network: Network | None = None) -> NodeRuns:
    network = network or Network(master=f"127.0.0.1:{free_port()}")
    logs = [run.parent / f"{run.name}.node{rank}.log" for rank in range(2)]
    processes = []
    started = time.monotonic()
    for rank, log in enumerate(logs):
        command = [*network.prefixes[rank], sys.executable, "-m", "trainer.launch", "--nodes", "2",
                   "--node-rank", str(rank), "--master", network.master, "--nproc", "1",
                   "--iface", network.ifaces[rank], *(["--hostfile", str(hostfile)] if hostfile else []),
                   "--features", str(features), "--run", str(run),
                   "--config", str(REPO_ROOT / "conf" / "train.yaml"), *overrides]
        with log.open("w") as stream:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=stream,
                                              stderr=subprocess.STDOUT))
    ended: list[float | None] = [None, None]
    pids: set[int] = set()
    while None in ended:
        assert time.monotonic() - started < timeout, f"the nodes did not finish within {timeout} s"
        for index, process in enumerate(processes):
            if ended[index] is None:
                pids |= descendants(process.pid)
                if process.poll() is not None:
                    ended[index] = time.monotonic() - started
        time.sleep(0.5)
    return NodeRuns(run, [process.returncode for process in processes], [log.read_text() for log in logs],
                    ended, pids)


def read_trace(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "trace" / f"rank{rank:05d}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_nodes(one_group_features, tiny_model_overrides, tmp_path_factory) -> NodeRuns:
    root = tmp_path_factory.mktemp("two-nodes")
    hostfile = root / "hostfile"
    hostfile.write_text("# two nodes of one rank each, both on this machine\n"
                        "127.0.0.1 slots=1\nlocalhost slots=1\n")
    nodes = launch_two_nodes(one_group_features, root / "run",
                             run_overrides(tiny_model_overrides, "distributed.trace=true"), hostfile)
    assert nodes.codes == [0, 0], "\n".join(output[-4000:] for output in nodes.outputs)
    return nodes


@pytest.fixture(scope="module")
def killed(one_group_features, tiny_model_overrides, tmp_path_factory) -> NodeRuns:
    """Rank 1 (node 1) SIGKILLs itself after step KILL_AT (the fire drill: a real SIGKILL)."""
    return launch_two_nodes(one_group_features, tmp_path_factory.mktemp("killed") / "run", run_overrides(
        tiny_model_overrides, "distributed.fault=kill", "distributed.fault_rank=1",
        f"distributed.fault_step={KILL_AT}"))


EPOCH_STEPS = 3
"""40 rows in global batches of 16: 3 steps an epoch; each rank's 20 rows of one row group go 8, 8, 4."""


def assert_one_world_of_disjoint_shards(nodes: NodeRuns) -> None:
    traces = [read_trace(nodes.run, rank) for rank in range(2)]
    assert [[record["step"] for record in trace] for trace in traces] == [list(range(1, STEPS + 1))] * 2
    for mine, theirs in zip(*traces):
        assert len(mine["rows"]) == len(theirs["rows"]) == (4 if mine["step"] % EPOCH_STEPS == 0 else 8)
        assert not set(mine["rows"]) & set(theirs["rows"]), f"step {mine['step']}: a row trained twice"
        assert mine["params"] == theirs["params"], f"step {mine['step']}: the replicas differ"
    for first in range(0, STEPS - EPOCH_STEPS + 1, EPOCH_STEPS):  # each whole epoch: the 40 rows once
        trained = [row for trace in traces for record in trace[first:first + EPOCH_STEPS]
                   for row in record["rows"]]
        assert len(trained) == len(set(trained)) == 40, f"epoch from step {first + 1}"
    assert "training 10 steps on 2 ranks, global batch 16 (8 per rank, 2 logical shards)" in nodes.outputs[0]


@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_train_disjoint_shards_into_identical_replicas(two_nodes):
    assert_one_world_of_disjoint_shards(two_nodes)


@pytest.fixture
def network_namespaces():
    """Two network namespaces joined by a veth pair, 10.231.7.1 ↔ 10.231.7.2: two hosts that share
    no loopback, so the ranks must talk over a real interface to a real remote address."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"sf{os.getpid() % 100000}"
    spaces, links = [f"{tag}n{index}" for index in range(2)], [f"{tag}v{index}" for index in range(2)]
    setup = [["netns", "add", spaces[0]], ["netns", "add", spaces[1]],
             ["link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for index in range(2):
        setup += [["link", "set", links[index], "netns", spaces[index]],
                  ["-n", spaces[index], "addr", "add", f"10.231.7.{index + 1}/24", "dev", links[index]],
                  ["-n", spaces[index], "link", "set", links[index], "up"],
                  ["-n", spaces[index], "link", "set", "lo", "up"],
                  ["netns", "exec", spaces[index], sys.executable, "-c", "pass"]]
    try:
        for arguments in setup:
            result = subprocess.run(["ip", *arguments], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot build network namespaces here: ip {' '.join(arguments)}: "
                            f"{result.stderr.strip()}")
        yield Network(master="10.231.7.1:29500",
                      prefixes=(("ip", "netns", "exec", spaces[0]), ("ip", "netns", "exec", spaces[1])),
                      ifaces=(links[0], links[1]))
    finally:
        for space in spaces:
            subprocess.run(["ip", "netns", "delete", space], capture_output=True)


@pytest.mark.slow
@pytest.mark.multinode
def test_two_hosts_in_separate_network_namespaces_train_as_one_world(
        network_namespaces, one_group_features, tiny_model_overrides, tmp_path):
    nodes = launch_two_nodes(one_group_features, tmp_path / "run",
                             run_overrides(tiny_model_overrides, "distributed.trace=true"),
                             network=network_namespaces)
    assert nodes.codes == [0, 0], "\n".join(output[-4000:] for output in nodes.outputs)
    assert_one_world_of_disjoint_shards(nodes)
    assert "master_addr=10.231.7.1" in nodes.outputs[1]  # node 1 reached node 0 over the veth link


@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_train_on_the_global_batches_of_a_single_rank(two_nodes, one_group_features, tiny_spec):
    """The world size changes who reads a row, never which rows form global batch k."""
    traces = [read_trace(two_nodes.run, rank) for rank in range(2)]
    with TrainStream(one_group_features, tiny_spec, BATCH, 16, 0, 0, 1, shards=2) as stream:
        for step in range(STEPS):
            batch = next(stream)
            real = real_rows(batch).numpy()
            single = row_fingerprints(batch["user_key"].numpy()[real], batch["ts"].numpy()[real])
            assert single == traces[0][step]["rows"] + traces[1][step]["rows"], f"step {step + 1}"


@pytest.mark.slow
@pytest.mark.multinode
def test_two_nodes_finish_with_one_model(two_nodes, tiny_spec):
    assert complete_tags(two_nodes.run) == ["step00000005", "step00000010"]
    marker = json.loads((checkpoint_root(two_nodes.run) / "step00000010" / COMPLETE_MARKER).read_text())
    assert FeatureSpec(**marker.pop("spec")) == tiny_spec  # what a resume checks the dataset against
    assert marker == {"step": 10, "world": 2, "data": {"steps": 10, "shards": 2, "seed": 0,
                                                      "batch_size": BATCH, "shuffle_buffer": 16}}
    assert (two_nodes.run / "export" / "latest" / "_SUCCESS").is_file()
    assert not (two_nodes.run / LAUNCH_DIR).exists()  # the hostfile given was used, no other written


@pytest.mark.slow
@pytest.mark.multinode
def test_a_killed_rank_stops_every_node_in_bounded_time(killed):
    node0, node1 = killed.outputs
    assert killed.codes[1] != 0 and killed.codes[0] == EXIT_PEER_FAILED, "\n".join(killed.outputs)
    assert f"fire drill: rank 1 kill at step {KILL_AT}" in node1
    assert re.search(r"stopping rank 0: rank 1 \(pid \d+ on .+\) has sent no heartbeat for \d+ s", node0)
    # Detection takes the heartbeat timeout; the margin absorbs launcher polling on a loaded machine.
    assert killed.ended[0] - killed.ended[1] < HEARTBEAT_TIMEOUT_S + 45, killed.ended
    leftovers = [pid for pid in killed.pids if running(pid, str(killed.run))]
    assert killed.pids and not leftovers, f"processes left running: {leftovers}"


@pytest.mark.slow
@pytest.mark.multinode
def test_the_last_complete_checkpoint_survives_the_kill(killed):
    assert complete_tags(killed.run) == ["step00000005"]
    root = checkpoint_root(killed.run)
    assert (root / LATEST).read_text().strip() == "step00000005"
    assert not any(path.name > "step00000005" for path in root.iterdir() if path.name.startswith("step"))
    with weights_only_loads():
        state = torch.load(root / "step00000005" / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == 5 and state["data"]["steps"] == 5
    assert all(torch.isfinite(tensor).all() for tensor in state["module"].values())


# The watchdog protocol, over a real TCP store in this process.

@pytest.fixture
def store_port():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=10))
    yield server.port, dist.PrefixStore(STORE_PREFIX, server)


class Verdicts:
    """What each watchdog would have ended its process with."""

    def __init__(self):
        self.reasons: dict[int, str] = {}
        self.arrived = threading.Event()

    def recorder(self, rank: int):
        def record(reason: str) -> None:
            self.reasons[rank] = reason
            self.arrived.set()
        return record


def started_pair(port: int, heartbeat_timeout_s: float, verdicts: Verdicts) -> list[Watchdog]:
    """The watchdogs of rank 1 and rank 0 (started in that order: rank 0 waits for rank 1's beat)."""
    watchdogs = [Watchdog(rank, 2, heartbeat_timeout_s, "127.0.0.1", port, on_abort=verdicts.recorder(rank))
                 for rank in (1, 0)]
    for watchdog in watchdogs:
        watchdog.start()
    return watchdogs


def test_a_crashed_rank_stops_the_others_at_once_naming_its_error(store_port):
    port, _ = store_port
    verdicts = Verdicts()
    watchdogs = started_pair(port, 2.0, verdicts)
    crashed = watchdogs[0]
    crashed.step = 12
    crashed.fail(ValueError("row group 7 is corrupt"))
    assert verdicts.arrived.wait(timeout=15)
    assert verdicts.reasons == {0: "rank 1 failed at step 12: ValueError: row group 7 is corrupt"}
    for watchdog in watchdogs:
        watchdog.close()


def test_a_silent_rank_is_declared_dead_within_the_heartbeat_timeout(store_port):
    """Rank 1 beats once, then nothing: what rank 0 sees of a process that was SIGKILLed."""
    port, store = store_port
    store.set("who/1", "pid 4242 on node-b")
    store.set("beat/1", "1 3")
    verdicts = Verdicts()
    watchdog = Watchdog(0, 2, 1.0, "127.0.0.1", port, on_abort=verdicts.recorder(0))
    started = time.monotonic()
    watchdog.start()
    assert verdicts.arrived.wait(timeout=15)
    assert time.monotonic() - started >= 1.0
    assert re.fullmatch(r"rank 1 \(pid 4242 on node-b\) has sent no heartbeat for \d+ s, last at step 3: "
                        r"it died \(killed, out of memory, node lost\) or froze", verdicts.reasons[0])
    watchdog.close()


def test_ranks_that_finish_are_not_taken_for_dead(store_port):
    port, _ = store_port
    verdicts = Verdicts()
    watchdogs = started_pair(port, 0.6, verdicts)
    watchdogs[0].close()  # rank 1 is done first; rank 0 goes on watching for a while
    assert not verdicts.arrived.wait(timeout=3)
    watchdogs[1].close()
    assert verdicts.reasons == {}


def test_a_failed_collective_with_no_rank_found_dead_is_reported_after_the_bound(store_port):
    """A collective that times out while every rank still beats (a rank stuck, not dead): the
    rank that saw it waits one heartbeat timeout for a better explanation, then posts its own."""
    port, _ = store_port
    verdicts = Verdicts()
    watchdogs = started_pair(port, 1.0, verdicts)
    started = time.monotonic()
    watchdogs[1].fail(dist.DistError("gloo: Timed out waiting 120000ms for recv operation to complete"))
    assert time.monotonic() - started >= 1.0
    assert verdicts.arrived.wait(timeout=15)
    assert verdicts.reasons == {1: "rank 0: a collective failed and no rank was found dead or failed within "
                                   "1 s (a rank stuck past distributed.timeout_s?): gloo: Timed out waiting "
                                   "120000ms for recv operation to complete"}
    for watchdog in watchdogs:
        watchdog.close()


STORE_HOST = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
print(store.port, flush=True)
time.sleep(120)
"""


def test_losing_rank_0_and_its_store_stops_the_other_ranks():
    with subprocess.Popen([sys.executable, "-c", STORE_HOST], stdout=subprocess.PIPE, text=True) as host:
        try:
            port = int(host.stdout.readline())
            verdicts = Verdicts()
            watchdog = Watchdog(1, 2, 1.0, "127.0.0.1", port, on_abort=verdicts.recorder(1))
            watchdog.start()
            host.send_signal(signal.SIGKILL)
            assert verdicts.arrived.wait(timeout=15)
            assert verdicts.reasons[1].startswith(
                f"rank 1 lost contact with rank 0, which hosts the rendezvous store at 127.0.0.1:{port}")
            watchdog.close()
        finally:
            host.kill()


DYING_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "from trainer.watchdog import die_with_parent; die_with_parent(); print('ready', flush=True); "
    "import time; time.sleep(120)"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_rank_dies_with_its_launcher():
    with subprocess.Popen([sys.executable, "-c", DYING_PARENT], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          text=True) as parent:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while running(child):
        assert time.monotonic() < deadline, "the rank outlived its launcher"
        time.sleep(0.1)


# Launch recipes.

def test_launcher_commands_for_one_node_and_for_one_node_of_many():
    local = deepspeed_command(TRAIN_SCRIPT, 2, 29500, None, ["seed=1"])
    assert local[1:] == ["--num_gpus", "2", "--master_port", "29500", str(TRAIN_SCRIPT), "seed=1"]
    node = deepspeed_command(TRAIN_SCRIPT, 8, 29511, "c.yaml", ["seed=1"], nodes=4, node_rank=3,
                             hostfile=Path("/h"), master_addr="10.0.0.1")
    assert node[1:] == ["--hostfile", "/h", "--num_nodes", "4", "--no_ssh", "--node_rank", "3",
                        "--num_gpus", "8", "--master_addr", "10.0.0.1", "--master_port", "29511",
                        str(TRAIN_SCRIPT), "--config", "c.yaml", "seed=1"]


def test_every_rank_gets_the_environment_it_needs():
    env = launch_env({"PATH": "/bin", "OMP_NUM_THREADS": "4"}, iface="ib0")
    assert env_file_text(env).splitlines() == [
        f"PYTHONPATH={REPO_ROOT}", "OMP_NUM_THREADS=4", f"TORCH_EXTENSIONS_DIR={env['TORCH_EXTENSIONS_DIR']}",
        "GLOO_SOCKET_IFNAME=ib0", "NCCL_SOCKET_IFNAME=ib0"]


def dry_run(capsys, *argv: str) -> str:
    assert train_main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_ssh_launch_dry_run_shows_the_pdsh_command_deepspeed_would_run(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=8\n")
    out = dry_run(capsys, "--hostfile", str(hostfile), "--nodes", "2", "--nproc", "8", "--iface", "eth0",
                  "--master", "10.1.0.5:29600", "--features", "/data/f", "--run", str(tmp_path / "run"))
    lines = out.splitlines()
    env_file = tmp_path / "run" / LAUNCH_DIR / ENV_FILE
    assert lines[0] == f"# {env_file}" and "GLOO_SOCKET_IFNAME=eth0" in lines
    launcher = shlex.split(lines[lines.index("# launcher") + 1])
    assert launcher[0] == f"DS_ENV_FILE={env_file}"
    assert launcher[2:8] == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8"]
    remote = shlex.split(lines[lines.index("# what the launcher starts on the hosts over pdsh") + 1])
    assert remote[:6] == ["pdsh", "-S", "-f", "1024", "-w", "gpu-a,gpu-b"]
    exports = remote[6]
    for expected in (f"export PYTHONPATH={REPO_ROOT};", "export OMP_NUM_THREADS=1;",
                     "export NCCL_SOCKET_IFNAME=eth0;"):
        assert expected in exports
    assert remote[7] == f"cd {REPO_ROOT};"
    world = next(arg for arg in remote if arg.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {
        "gpu-a": list(range(8)), "gpu-b": list(range(8))}
    assert {"--node_rank=%n", "--master_addr=10.1.0.5", "--master_port=29600"} <= set(remote)
    assert remote[remote.index(str(TRAIN_SCRIPT)) + 1:] == ["features=/data/f", f"run={tmp_path / 'run'}"]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_no_ssh_dry_run_describes_this_node_of_the_world(tmp_path, capsys):
    out = dry_run(capsys, "--nodes", "3", "--node-rank", "2", "--master", "10.1.0.5:29600", "--nproc", "4",
                  "--features", "/data/f", "--run", str(tmp_path / "run"))
    hostfile = tmp_path / "run" / LAUNCH_DIR / "hostfile.node2"
    assert f"# {hostfile}\nnode0 slots=4\nnode1 slots=4\nnode2 slots=4\n" in out
    launcher = shlex.split(out.split("# launcher\n")[1].splitlines()[0])
    assert launcher[1:14] == ["--hostfile", str(hostfile), "--num_nodes", "3", "--no_ssh", "--node_rank", "2",
                              "--num_gpus", "4", "--master_addr", "10.1.0.5", "--master_port", "29600"]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "several nodes need --hostfile"),
    (["--nodes", "2", "--node-rank", "1"], "--node-rank needs --master"),
    (["--nodes", "2", "--node-rank", "2", "--master", "h:1"], r"--node-rank must be in \[0, 2\)"),
    (["--nodes", "2", "--node-rank", "0", "--master", "h"], "--master must look like ADDR:PORT"),
])
def test_inconsistent_topologies_fail_before_anything_starts(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*argv, "--features", str(tmp_path), "--run", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not local_path(tmp_path / "run").exists()
