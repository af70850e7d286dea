"""``sirenfeed produce --raw RAW_DIR --topic T [--rate EVENTS_PER_S] [--from DATE --to DATE]``.

Replays raw events (``RAW_DIR/date=YYYY-MM-DD/**/*.parquet``, exactly the ``raw_arrow_schema`` of
the event schema ``schema``: the synthetic logs or a landing zone) into Kafka as JSON with
``schema_version``, keyed by the schema's user field so that all of a user's events go to one
partition, and in event-time order, day by day, so each user's events arrive in the order they
happened. Rows are sent as they are, contract violations included: the ingest consumer is the one
that judges them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common.config import add_config_arguments, config_from_args
from common.files import visible_files
from common.logs import configure_logging
from features.dataset import MANIFEST_NAME, is_complete
from features.schema import DEFAULT_SCHEMA, SCHEMA_VERSION, EventSchema, load_schema
from ingest.broker import BrokerError
from ingest.clients import Producer, make_producer
from ingest.config import IngestConfig

log = logging.getLogger(__name__)

DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


class RawInputError(ValueError):
    """A raw directory that does not hold raw events in the contract's layout."""


@dataclass(frozen=True)
class ReplayResult:
    sent: int
    dates: list[str]
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def raw_dates(raw_dir: str | Path, from_date: str = "", to_date: str = "") -> dict[str, list[Path]]:
    """``date → Parquet files`` of ``raw_dir`` within ``[from_date, to_date]``, in date order."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise RawInputError(f"raw directory {root} does not exist")
    if (root / MANIFEST_NAME).is_file() and not is_complete(root):
        raise RawInputError(f"{root} has a manifest but no success marker: it is still being written "
                            "or its writer failed")
    dates: dict[str, list[Path]] = {}
    for directory in sorted(root.iterdir()):
        match = DATE_DIR.match(directory.name)
        if not match or not directory.is_dir():
            continue
        date = match.group(1)
        if (from_date and date < from_date) or (to_date and date > to_date):
            continue
        files = visible_files(directory)
        if files:
            dates[date] = files
    return dates


def read_day(files: list[Path], schema: EventSchema | str = DEFAULT_SCHEMA) -> pa.Table:
    """One day's events in the order they are sent: by event time, ties broken by the event id."""
    schema = load_schema(schema)
    expected = schema.raw_arrow_schema
    tables = []
    for path in files:
        table = pq.read_table(path)
        # Ignore hive partition columns a reader may add; require exactly the contract otherwise.
        columns = [name for name in table.column_names if name not in ("date", "hour")]
        if columns != expected.names or not table.select(columns).schema.equals(expected):
            raise RawInputError(f"{path} does not have the raw event schema of schema "
                                f"'{schema.name}': {table.schema}")
        tables.append(table.select(columns).replace_schema_metadata(None))
    table = pa.concat_tables(tables)
    order = pc.sort_indices(table, sort_keys=[(schema.time_field, "ascending"),
                                              (schema.config.event_id, "ascending")],
                            null_placement="at_start")
    return table.take(order)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps({**event, "schema_version": SCHEMA_VERSION}, separators=(",", ":")).encode()


def event_messages(table: pa.Table, schema: EventSchema | str = DEFAULT_SCHEMA
                   ) -> Iterator[tuple[bytes | None, bytes]]:
    """``(key, value)`` per row: the key is the schema's user field (none when the row has no usable
    one)."""
    user_field = load_schema(schema).config.user
    for batch in table.to_batches(max_chunksize=4096):
        for event in batch.to_pylist():
            user = event[user_field]
            yield (user.encode() if isinstance(user, str) and user else None), encode(event)


def send_messages(producer: Producer, topic: str, messages: Iterable[tuple[bytes | None, bytes]],
                  rate: float = 0.0, total: int | None = None, description: str = "produce") -> int:
    """Send ``messages`` in order at ``rate`` per second (0 = as fast as possible); wait for every
    acknowledgement and fail if any send failed. Returns the number sent."""
    started = time.monotonic()
    sent = 0
    with tqdm(total=total, desc=description, unit="ev", disable=None, mininterval=1.0) as progress:
        for key, value in messages:
            if rate:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0.001:
                    time.sleep(ahead)
            producer.send(topic, value, key)
            sent += 1
            if sent % 1024 == 0:
                progress.update(1024)
        progress.update(sent % 1024)
    failures = producer.flush()
    if failures:
        raise RuntimeError(f"{len(failures)} of {sent} messages to {topic} were not acknowledged; "
                           f"first error: {failures[0]!r}")
    return sent


def replay(config: IngestConfig, raw_dir: str | Path, topic: str | None = None) -> ReplayResult:
    """Send the raw events of ``raw_dir`` (dates ``producer.from_date..to_date``) to ``topic``."""
    topic = topic or config.kafka.topic
    schema = config.event_schema
    dates = raw_dates(raw_dir, config.producer.from_date, config.producer.to_date)
    if not dates:
        first, last = config.producer.from_date or "the first", config.producer.to_date or "the last"
        raise RawInputError(f"no date=YYYY-MM-DD/*.parquet under {raw_dir} between {first} and {last} date")
    producer = make_producer(config)
    started = time.monotonic()
    sent = 0
    try:
        for date, files in dates.items():
            table = read_day(files, schema)
            sent += send_messages(producer, topic, event_messages(table, schema), config.producer.rate,
                                  total=table.num_rows, description=f"produce {date}")
    finally:
        producer.close()
    result = ReplayResult(sent, list(dates), time.monotonic() - started)
    log.info("sent %d events of %d day(s) to %s in %.1fs (%.0f events/s)", result.sent, len(result.dates),
             topic, result.seconds, result.events_per_s)
    return result


def main(argv: list[str]) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="sirenfeed produce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, metavar="RAW_DIR",
                        help="raw events: RAW_DIR/date=YYYY-MM-DD/")
    parser.add_argument("--topic", help="target topic (kafka.topic)")
    parser.add_argument("--rate", type=float, metavar="EVENTS_PER_S",
                        help="target send rate (producer.rate; 0 = as fast as possible)")
    parser.add_argument("--from", dest="from_date", metavar="DATE", help="first date, YYYY-MM-DD")
    parser.add_argument("--to", dest="to_date", metavar="DATE", help="last date, YYYY-MM-DD")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(IngestConfig, args, **{
        "kafka.topic": args.topic, "producer.rate": args.rate,
        "producer.from_date": args.from_date, "producer.to_date": args.to_date})
    try:
        result = replay(config, args.raw)
    except (RawInputError, BrokerError) as error:
        log.error("%s", error)
        return 2
    print(json.dumps({"sent": result.sent, "dates": result.dates, "seconds": round(result.seconds, 3),
                      "events_per_s": round(result.events_per_s, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
