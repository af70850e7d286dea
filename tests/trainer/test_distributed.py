"""DeepSpeed's CPU shared-memory segments: released by the ranks at init, so even a run killed
outright leaves nothing in ``/dev/shm``; the launcher's sweep removes those of ranks that died
before releasing them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.repo import REPO_ROOT
from trainer import distributed
from trainer.distributed import remove_leftover_segments, segment_name


def segments() -> set[Path]:
    return set(distributed.SHM_ROOT.glob(f"{distributed.SHM_PREFIX}_{os.getuid()}_*"))


def test_the_sweep_removes_only_the_segments_of_its_port(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "SHM_ROOT", tmp_path)
    mine = [tmp_path / segment_name("127.0.0.1", 29513, rank) for rank in (0, 1)]
    other_run = tmp_path / segment_name("127.0.0.1", 29514, 0)
    for path in (*mine, other_run):
        path.write_bytes(b"\0" * 16)
    assert remove_leftover_segments(29513) == 2
    assert sorted(tmp_path.iterdir()) == [other_run]
    assert remove_leftover_segments(29513) == 0


@pytest.mark.slow
@pytest.mark.skipif(not distributed.SHM_ROOT.is_dir(), reason="no POSIX shared memory filesystem")
def test_a_run_killed_outright_leaves_no_shared_memory(tiny_features, tiny_model_overrides, tmp_path):
    """SIGKILL to the whole launch (wrapper, launcher, ranks): nobody gets to clean up afterwards, so
    only a release at init keeps the two ~70 MB segments from staying in RAM."""
    before = segments()
    command = [sys.executable, "-m", "trainer.launch", "--features", str(tiny_features),
               "--run", str(tmp_path / "run"), "--nproc", "2", *tiny_model_overrides,
               "data.batch_size=16", "train.steps=100000", "train.eval_every=0", "train.checkpoint_every=0"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if " training " in line and " steps on 2 ranks" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(240), "the run never started training:\n" + "".join(lines[-60:])
        output = "".join(lines)
        assert "shm_comm" in output and "built successfully" in output, "DeepSpeed ran without shm_comm"
        deadline = time.monotonic() + 30
        while segments() - before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
        assert segments() - before == set(), "the ranks still hold named segments while training"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        # The launcher's own group (common.concurrency) holds the pipe until its keeper has
        # stopped it, up to the keeper's grace period after the wrapper died.
        reader.join(timeout=60)
        process.stdout.close()
    assert segments() - before == set()
