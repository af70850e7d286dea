"""Fixtures of the ingest tests: one real embedded broker per session, small synthetic raw logs (of the
feed and of the watch schema), and a fresh :class:`ingest_support.Stream` (topic pair, group, landing
zone) per test."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Iterable

import pytest
from ingest_support import Message, Stream

from common.config import load_config
from features.synth import SynthConfig, write_synthetic_logs
from ingest.broker import EmbeddedBroker
from ingest.config import IngestConfig
from ingest.producer import event_messages, raw_dates, read_day


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterable[EmbeddedBroker]:
    run_dir = tmp_path_factory.mktemp("broker")
    config = load_config(IngestConfig, overrides=[f"broker.run_dir={run_dir}"])
    embedded = EmbeddedBroker(config)
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """Two days of synthetic logs (about 2.5k events) with some contract violations and duplicates."""
    start = (dt.date.today() - dt.timedelta(days=10)).isoformat()
    out = tmp_path_factory.mktemp("raw") / "raw"
    write_synthetic_logs(SynthConfig(users=50, days=2, seed=7, start_date=start,
                                     bad_fraction=0.01, duplicate_fraction=0.01), out)
    return out


@pytest.fixture(scope="session")
def watch_raw_dir(tmp_path_factory) -> Path:
    """One day of synthetic logs of the watch schema (about 500 events), faults and duplicates too."""
    start = (dt.date.today() - dt.timedelta(days=10)).isoformat()
    out = tmp_path_factory.mktemp("watch") / "raw"
    write_synthetic_logs(SynthConfig(schema="watch", users=30, days=1, seed=3, start_date=start,
                                     bad_fraction=0.02, duplicate_fraction=0.01), out)
    return out


@pytest.fixture(scope="session")
def raw_messages(raw_dir) -> dict[str, list[Message]]:
    """The replay messages of each raw date, exactly as ``sirenfeed produce`` sends them."""
    return {date: list(event_messages(read_day(files))) for date, files in raw_dates(raw_dir).items()}


@pytest.fixture
def stream(broker, tmp_path) -> Iterable[Stream]:
    created = Stream(broker, tmp_path)
    yield created
    created.stop_all()
