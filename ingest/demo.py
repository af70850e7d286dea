"""The streaming leg of ``make demo``: the last day of raw events through Kafka into the landing zone.

:func:`streaming_leg` starts the embedded broker, replays the last day of ``raw_dir`` plus a corpus of
malformed messages (:func:`bad_messages`, one per kind of contract violation), ingests until idle and
checks the result: the landed ``event_id``\\ s are exactly the replayed valid ones (as a multiset:
nothing lost, nothing twice) and every malformed message is dead-lettered with its reason.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import load_config
from features.schema import (
    REASON_BAD_TYPE, REASON_EMPTY, REASON_MISSING, REASON_NOT_AN_OBJECT, REASON_NOT_JSON,
    REASON_OUT_OF_RANGE, REASON_OVERSIZE, REASON_TOO_LONG, REASON_TS_BEFORE_EPOCH,
    REASON_TS_IN_FUTURE, REASON_UNKNOWN_SCHEMA_VERSION, SCHEMA_VERSION, ContractConfig,
)
from features.validation import check_message
from ingest.broker import embedded_broker
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.consumer import Ingestor
from ingest.landing import read_dead_letters, read_landed
from ingest.producer import event_messages, raw_dates, read_day, send_messages

log = logging.getLogger(__name__)

YEAR_MS = 365 * 86_400_000


class StreamingCheckFailed(AssertionError):
    """What landed is not exactly what was replayed."""


_DROP = object()


def bad_messages(template: dict[str, Any], contract: ContractConfig) -> list[tuple[str, bytes]]:
    """``(expected reason, raw bytes)`` for each kind of malformed message, built from a valid event."""

    def variant(**changes: Any) -> bytes:
        event = {**template, "schema_version": SCHEMA_VERSION, **changes}
        return json.dumps({key: value for key, value in event.items() if value is not _DROP}).encode()

    now_ms = int(time.time() * 1000)
    return [
        (REASON_NOT_JSON, b"\xff\xfe\x00 not utf-8"),
        (REASON_NOT_JSON, b'{"event_id": "truncated'),
        (REASON_NOT_JSON, b""),
        (REASON_NOT_AN_OBJECT, b"[1, 2, 3]"),
        (REASON_OVERSIZE, variant(topic="x" * contract.max_message_bytes)),
        (REASON_UNKNOWN_SCHEMA_VERSION, variant(schema_version=99)),
        (REASON_UNKNOWN_SCHEMA_VERSION, variant(schema_version=True)),
        (f"{REASON_MISSING}:event_id", variant(event_id=_DROP)),
        (f"{REASON_MISSING}:like", variant(like=None)),
        (f"{REASON_BAD_TYPE}:dwell_ms", variant(dwell_ms="1200")),
        (f"{REASON_BAD_TYPE}:click", variant(click=1)),
        (f"{REASON_BAD_TYPE}:event_ts", variant(event_ts=float(template["event_ts"]))),
        (f"{REASON_EMPTY}:user_id", variant(user_id="")),
        (f"{REASON_TOO_LONG}:item_id", variant(item_id="i" * (contract.max_string_len + 1))),
        (f"{REASON_OUT_OF_RANGE}:dwell_ms", variant(dwell_ms=-5)),
        (f"{REASON_OUT_OF_RANGE}:dwell_ms", variant(dwell_ms=2**31)),
        (REASON_TS_BEFORE_EPOCH, variant(event_ts=contract.epoch_ms - 1)),
        (REASON_TS_IN_FUTURE, variant(event_ts=now_ms + contract.max_future_ms + YEAR_MS)),
    ]


def streaming_leg(raw_dir: str | Path, work_dir: str | Path,
                  config: IngestConfig | None = None) -> dict[str, Any]:
    """Replay the last day of ``raw_dir`` through the embedded broker into ``work_dir/landing``.

    ``work_dir/landing`` and ``work_dir/broker`` belong to this function and are recreated. Returns the
    counts, the check results and ``summary`` (text to print); raises :class:`StreamingCheckFailed`
    when the landing zone does not hold exactly the replayed valid events.
    """
    work = Path(work_dir)
    landing = work / "landing"
    shutil.rmtree(landing, ignore_errors=True)
    config = config or load_config(IngestConfig)
    config = replace(config,
                     landing=replace(config.landing, dir=str(landing), dead_letter_dir=""),
                     broker=replace(config.broker, run_dir=str(work / "broker"), port=0),
                     consumer=replace(config.consumer, until_idle_s=config.consumer.until_idle_s or 3.0),
                     metrics=replace(config.metrics, report_lag=False))
    dates = raw_dates(raw_dir)
    if not dates:
        raise StreamingCheckFailed(f"no raw events under {raw_dir}")
    last_date = max(dates)
    day = read_day(dates[last_date])
    messages = list(event_messages(day))
    verdicts = [check_message(raw, config.contract) for _, raw in messages]
    template = next((event for event, _ in verdicts if event is not None), None)
    if template is None:
        raise StreamingCheckFailed(f"no valid event in {raw_dir} on {last_date}")
    corpus = bad_messages(template, config.contract)
    messages += [(None, raw) for _, raw in corpus]
    verdicts += [check_message(raw, config.contract) for _, raw in corpus]
    # What should land is whatever the shared contract accepts, judged on the very bytes sent.
    expected = Counter(event["event_id"] for event, _ in verdicts if event is not None)
    expected_dead = Counter(reason for _, reason in verdicts if reason is not None)

    with embedded_broker(config) as address:
        config = replace(config, kafka=replace(config.kafka, bootstrap_servers=address))
        started = time.monotonic()
        producer = make_producer(config)
        try:
            produced = send_messages(producer, config.kafka.topic, messages, total=len(messages),
                                     description=f"replay {last_date}")
        finally:
            producer.close()
        summary = Ingestor(config).run()
        seconds = time.monotonic() - started

    landed_table = read_landed(landing, columns=["event_id", "event_ts"])
    landed = Counter(landed_table.column("event_id").to_pylist())
    dead = read_dead_letters(landing / "_dead_letter")
    dead_by_reason = dict(sorted(Counter(dead.column("reason").to_pylist()).items()))
    files = sum(1 for pattern in ("date=*/hour=*/*.parquet", "_dead_letter/date=*/*.parquet")
                for _ in landing.glob(pattern))
    newest_ms = max(landed_table.column("event_ts").to_pylist(), default=None)
    freshness_s = time.time() - newest_ms / 1000 if newest_ms is not None else None

    missing, extra = expected - landed, landed - expected
    problems = []
    if missing or extra:
        problems.append(f"{sum(missing.values())} replayed valid events missing, {sum(extra.values())} "
                        "unexpected or duplicated in the landing zone")
    if Counter(dead_by_reason) != expected_dead:
        problems.append(f"dead letters {dead_by_reason} differ from the rejected messages "
                        f"{dict(expected_dead)}")
    result = {
        "date": last_date, "produced": produced, "valid": sum(expected.values()),
        "landed": sum(landed.values()), "unique_landed": len(landed),
        "dead_lettered": dead_by_reason, "dead_lettered_total": dead.num_rows, "files": files,
        "freshness_s": freshness_s, "seconds": round(seconds, 2),
        "exactly_once": not missing and not extra, "ingest": summary.as_dict(),
    }
    result["summary"] = _summary_text(result)
    if problems:
        raise StreamingCheckFailed("; ".join(problems) + "\n" + result["summary"])
    return result


def _summary_text(result: dict[str, Any]) -> str:
    freshness = "n/a" if result["freshness_s"] is None else f"{result['freshness_s'] / 3600:.1f} h"
    lines = [
        f"streaming leg ({result['date']}): produced {result['produced']}, valid {result['valid']}, "
        f"landed {result['landed']} in {result['files']} files "
        f"({'exactly once' if result['exactly_once'] else 'MISMATCH'}), {result['seconds']} s",
        f"  dead-lettered {result['dead_lettered_total']}: "
        + ", ".join(f"{reason} {count}" for reason, count in result["dead_lettered"].items()),
        f"  freshness (now - newest landed event time): {freshness}",
    ]
    return "\n".join(lines)
