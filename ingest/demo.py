"""The streaming leg of ``make demo``: the last day of raw events through Kafka into the landing zone.

:func:`streaming_leg` starts the embedded broker, replays the last day of ``raw_dir`` plus a corpus of
malformed messages (:func:`bad_messages`, one per kind of contract violation), ingests until idle and
checks the result: the landed event ids are exactly the replayed valid ones (as a multiset: nothing
lost, nothing twice) and every malformed message is dead-lettered with its reason. The event schema
is the ingest config's ``schema``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import load_config
from features.schema import (
    INTEGER_KINDS, NUMERIC_KINDS, REASON_BAD_TYPE, REASON_EMPTY, REASON_MISSING, REASON_NOT_ALLOWED,
    REASON_NOT_AN_OBJECT, REASON_NOT_JSON, REASON_OUT_OF_RANGE, REASON_OVERSIZE, REASON_TOO_LONG,
    REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE, REASON_UNKNOWN_SCHEMA_VERSION, SCHEMA_VERSION,
    ContractConfig, EventSchema,
)
from features.synth_schema import not_allowed_value
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


def bad_messages(template: dict[str, Any], schema: EventSchema,
                 contract: ContractConfig) -> list[tuple[str, bytes]]:
    """``(expected reason, raw bytes)`` for each kind of malformed message, built from a valid event
    of ``schema``: every message-level fault, and each field-level fault on the first field of the
    schema it applies to (a kind no field of the schema can have is left out)."""

    def variant(**changes: Any) -> bytes:
        event = {**template, "schema_version": SCHEMA_VERSION, **changes}
        return json.dumps({key: value for key, value in event.items() if value is not _DROP}).encode()

    def broken(reason: str, field: str, value: Any) -> tuple[str, bytes]:
        """The template with ``field`` set to ``value``, failing with ``reason:field``."""
        return f"{reason}:{field}", variant(**{field: value})

    config = schema.config
    roles = (config.event_id, config.user, config.time.field)
    others = [field for field in schema.fields if field.name not in roles]
    time_field = schema.field(config.time.field)
    unit_ms = schema.time_unit_ms
    now_ms = int(time.time() * 1000)
    corpus = [
        (REASON_NOT_JSON, b"\xff\xfe\x00 not utf-8"),
        (REASON_NOT_JSON, b'{"event_id": "truncated'),
        (REASON_NOT_JSON, b""),
        (REASON_NOT_AN_OBJECT, b"[1, 2, 3]"),
        (REASON_OVERSIZE, variant(**{config.event_id: "x" * contract.max_message_bytes})),
        (REASON_UNKNOWN_SCHEMA_VERSION, variant(schema_version=99)),
        (REASON_UNKNOWN_SCHEMA_VERSION, variant(schema_version=True)),
        broken(REASON_MISSING, config.event_id, _DROP),
        broken(REASON_BAD_TYPE, time_field.name, float(template[time_field.name])),
        broken(REASON_EMPTY, config.user, ""),
    ]
    bools = [field.name for field in others if field.kind == "bool"]
    if bools:
        corpus += [broken(REASON_MISSING, bools[0], None), broken(REASON_BAD_TYPE, bools[0], 1)]
    integers = [field.name for field in others if field.kind in INTEGER_KINDS]
    if integers:
        corpus.append(broken(REASON_BAD_TYPE, integers[0], "1200"))
    free_strings = [field.name for field in others if field.kind == "string" and not field.values]
    if free_strings:
        name = free_strings[0]
        corpus.append(broken(REASON_TOO_LONG, name, name[0] * (contract.max_string_len + 1)))
    listed = [field for field in schema.fields if field.values]
    if listed:
        corpus.append(broken(REASON_NOT_ALLOWED, listed[0].name, not_allowed_value(listed[0].values)))
    bounded = [field for field in others if field.kind in NUMERIC_KINDS
               and (math.isfinite(field.lower) or math.isfinite(field.upper))]
    if bounded:
        field = bounded[0]
        # An integer field's own type bounds it, so both sides are out of range for an int32.
        cast = float if field.kind == "float64" else int
        if math.isfinite(field.lower):
            corpus.append(broken(REASON_OUT_OF_RANGE, field.name, cast(field.lower) - 5))
        if math.isfinite(field.upper):
            corpus.append(broken(REASON_OUT_OF_RANGE, field.name, cast(field.upper) + 1))
    before_epoch = (contract.epoch_ms - 1) // unit_ms
    if before_epoch >= time_field.lower:  # else it would be out of the field's range instead
        corpus.append((REASON_TS_BEFORE_EPOCH, variant(**{time_field.name: before_epoch})))
    corpus.append((REASON_TS_IN_FUTURE,
                   variant(**{time_field.name: (now_ms + contract.max_future_ms + YEAR_MS) // unit_ms})))
    return corpus


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
    schema = config.event_schema
    event_id, time_field = schema.config.event_id, schema.time_field
    dates = raw_dates(raw_dir)
    if not dates:
        raise StreamingCheckFailed(f"no raw events under {raw_dir}")
    last_date = max(dates)
    day = read_day(dates[last_date], schema)
    messages = list(event_messages(day, schema))
    verdicts = [check_message(raw, schema, config.contract) for _, raw in messages]
    template = next((event for event, _ in verdicts if event is not None), None)
    if template is None:
        raise StreamingCheckFailed(f"no valid event in {raw_dir} on {last_date}")
    corpus = bad_messages(template, schema, config.contract)
    messages += [(None, raw) for _, raw in corpus]
    verdicts += [check_message(raw, schema, config.contract) for _, raw in corpus]
    # What should land is whatever the shared contract accepts, judged on the very bytes sent.
    expected = Counter(event[event_id] for event, _ in verdicts if event is not None)
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

    landed_table = read_landed(landing, columns=[event_id, time_field], schema=schema)
    landed = Counter(landed_table.column(event_id).to_pylist())
    dead = read_dead_letters(landing / "_dead_letter")
    dead_by_reason = dict(sorted(Counter(dead.column("reason").to_pylist()).items()))
    files = sum(1 for pattern in ("date=*/hour=*/*.parquet", "_dead_letter/date=*/*.parquet")
                for _ in landing.glob(pattern))
    newest = max(landed_table.column(time_field).to_pylist(), default=None)
    freshness_s = time.time() - newest * schema.time_unit_ms / 1000 if newest is not None else None

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
    """Two lines for the demo's terminal. The freshness of a replayed past day says nothing, so it
    stays in the result only; the dead letters' reasons are in the ingest log."""
    return "\n".join([
        f"{result['date']} replayed: {result['produced']:,} messages, {result['valid']:,} valid, "
        f"{result['landed']:,} landed in {result['files']} files "
        f"({'exactly once' if result['exactly_once'] else 'MISMATCH'}), {result['seconds']:.1f} s",
        f"{result['dead_lettered_total']:,} malformed messages dead-lettered with their reasons "
        f"({len(result['dead_lettered'])} kinds)",
    ])
