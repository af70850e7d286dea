"""``sirenfeed demo``'s terminal: only its numbered steps, progress bars, tables and decisions; the
chatter of every step (our logs, warnings, the deepspeed launcher and ranks, spark-submit, Kafka)
in that step's log file (:func:`common.logs.output_to`, :class:`sirenfeed.demo.Steps`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from common.logs import LOG_FORMAT, output_to
from common.repo import REPO_ROOT
from sirenfeed.demo import StepFailed, Steps, cycle_summary
from trainer.launcher import run_launcher

CHATTER = [
    re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]"),  # DeepSpeed's logger
    re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARN)"),  # Spark's log4j
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) "),  # ours (common.logs)
    re.compile(r"\[INFO\]|\bWARN\b|ds_accelerator|Warning: |py4j|kafka\.", re.IGNORECASE),
]
"""What a line of launcher, Spark, Kafka client or log chatter looks like."""


@contextlib.contextmanager
def terminal_logging() -> Iterator[logging.Handler]:
    """A root handler on stderr, as ``sirenfeed``'s ``configure_logging`` sets up; made in the test
    itself, where ``sys.stderr`` is the one the test's capture reads."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.filterwarnings("default")  # the suite's turns warnings into errors: here one is shown
def test_output_to_sends_logs_warnings_prints_and_launched_processes_to_the_file(tmp_path, capfd):
    path = tmp_path / "logs" / "step.log"
    late = logging.getLogger("test_demo.late")
    late.propagate = False
    with terminal_logging() as handler:
        with output_to(path):
            logging.getLogger("test_demo").info("a log record")
            warnings.warn("a library's warning", UserWarning)
            print("a stray print")
            code = run_launcher(["sh", "-c", "echo launched out; echo launched err >&2"], dict(os.environ))
            # A library that sets up its own handler on stdout as it loads (DeepSpeed does).
            late.addHandler(logging.StreamHandler(sys.stdout))
            late.warning("a late handler's record")
        assert capfd.readouterr() == ("", "")
        assert handler.stream is sys.stderr
        logging.getLogger("test_demo").info("after the block")
    late.warning("the late handler after the block")
    late.handlers.clear()
    assert code == 0
    text = path.read_text()
    for line in ("a log record", "a library's warning", "a stray print", "launched out", "launched err",
                 "a late handler's record"):
        assert line in text
    out, err = capfd.readouterr()
    assert "after the block" in err and "the late handler after the block" in out


def test_a_step_shows_its_time_on_its_title_line_and_a_failed_one_the_end_of_its_log(tmp_path):
    out = io.StringIO()
    steps = Steps(2, tmp_path / "logs", out)
    with terminal_logging():
        with steps.step("quiet", "a quiet step"):
            logging.getLogger("test_demo").warning("only in the log")
        with pytest.raises(StepFailed), steps.step("boom", "a failing step"):
            logging.getLogger("test_demo").error("the cause")
            raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\[1/2\] a quiet step … \d+ s", lines[0])
    assert lines[1] == "[2/2] a failing step …"
    failure = " ".join(" ".join(lines[2:]).split())
    assert "failed after" in failure and f"the end of {tmp_path / 'logs' / '02-boom.log'}:" in failure
    assert "the cause" in failure and lines[-1].endswith("| RuntimeError: boom")
    assert "only in the log" not in out.getvalue()
    assert "only in the log" in (tmp_path / "logs" / "01-quiet.log").read_text()


def test_a_cycle_summary_gives_each_task_verdict_and_the_decision():
    evidence = {"events": 6094, "positives": 415, "users": 240, "tolerance": 0.002}
    record = {
        "published": False, "outcome": "insufficient_evidence", "reason": "…", "decided_at": 100.0,
        "trained": {"batch": 1, "max_event_ms": 1_780_617_572_625},
        "tasks": {"contribution": {**evidence, "verdict": "not worse", "change": -0.0209, "low": -0.0231,
                                   "high": -0.0188},
                  "like": {**evidence, "verdict": "too little evidence",
                           "shortfall": "20 positives < gate.min_positives 30"}},
    }
    lines = cycle_summary(record, produced_at=40.0).splitlines()
    assert lines[0].startswith("gate on 6,094 held-out events of 240 users")
    assert lines[1] == "  contribution  -2.09% [-2.31%, -1.88%], tolerance 0.20%: not worse"
    assert lines[2] == "  like          20 positives < gate.min_positives 30: too little evidence"
    assert lines[3] == "decision: insufficient evidence, kept the served model"
    assert lines[4] == "candidate trained through batch 1, newest event 2026-06-04 23:59 UTC"
    published = cycle_summary({**record, "published": True, "outcome": "publish"}, produced_at=40.0)
    assert "decision: PUBLISHED" in published and "serving in 60 s" in published


@pytest.mark.slow
def test_the_demo_prints_only_its_steps_tables_and_decisions(tmp_path):
    command = [str(Path(sys.executable).parent / "sirenfeed"), "demo", "--config", str(REPO_ROOT / "conf" / "demo.yaml"),
               f"work={tmp_path / 'work'}", "users=300", "days=3", "fresh_days=1",
               "train_overrides=[data.batch_size=128,train.epochs=1,schedule.warmup_steps=5,"
               "train.checkpoint_every=0]"]
    # stderr joins stdout as on a terminal: everything the user would see is counted.
    done = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    output = done.stdout
    assert done.returncode == 0, output
    lines = output.splitlines()
    assert len(lines) < 80, output
    titles = ["synthetic feed logs", "Spark feature job", "training 'siren'", "training 'ordinal'",
              "the exported 'siren' model", "streaming leg", "continuous retraining"]
    for number, title in enumerate(titles, 1):
        assert any(line.startswith(f"[{number}/7] {title}") for line in lines), output
    table = next(index for index, line in enumerate(lines) if line.split()[:2] == ["run", "task"])
    assert "ΔNE%" in lines[table]
    assert {line.split()[0] for line in lines[table + 2:table + 8]} == {"siren", "ordinal"}
    assert any(line.strip().startswith("decision: ") for line in lines), output
    chatter = [line for line in lines if any(pattern.search(line) for pattern in CHATTER)]
    assert not chatter, output

    named = " ".join(output[output.rindex("\nlogs: ") + len("\nlogs: "):].split()).split(", ")
    logs = (tmp_path / named[0]).parent
    files = [logs / Path(named[0]).name, *(logs / name for name in named[1:])]
    assert [path.name for path in files] == sorted(path.name for path in logs.iterdir())
    assert len(files) == 7 and all(path.stat().st_size > 0 for path in files)
    assert "SparkContext" in (logs / "02-features.log").read_text()
    assert "[INFO]" in (logs / "03-train-siren.log").read_text()  # the deepspeed launcher's
    retrain = (logs / "07-retrain.log").read_text()
    assert "features.incremental" in retrain and "trainer/resident.py" in retrain and "features/resident.py" in retrain
