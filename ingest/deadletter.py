"""Dead letters: messages that break the event contract, kept with why and where they came from.

A message :func:`features.validation.check_message` rejects is never dropped and never stops the
stream. It is written twice: to the dead-letter topic (value = the raw bytes, headers = reason and
origin), and to dead-letter Parquet in the landing zone (:data:`DEAD_LETTER_SCHEMA`) as part of the
same exactly-once batch as the valid events read with it (:mod:`ingest.landing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ingest.clients import ClientError, Producer

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("raw", pa.binary()),
    pa.field("key", pa.binary()),
    pa.field("topic", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("kafka_timestamp_ms", pa.int64()),
    pa.field("reason", pa.string()),
    pa.field("dead_lettered_at_ms", pa.int64()),
])


@dataclass(frozen=True)
class DeadLetter:
    raw: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    kafka_timestamp_ms: int | None
    reason: str
    dead_lettered_at_ms: int

    @property
    def reason_kind(self) -> str:
        """The reason without its field (``bad_type:dwell_ms`` → ``bad_type``), for metric labels."""
        return self.reason.split(":", 1)[0]

    def headers(self) -> list[tuple[str, bytes]]:
        return [("reason", self.reason.encode()), ("source_topic", self.topic.encode()),
                ("source_partition", str(self.partition).encode()),
                ("source_offset", str(self.offset).encode()),
                ("dead_lettered_at_ms", str(self.dead_lettered_at_ms).encode())]


def dead_letter_table(letters: list[DeadLetter]) -> pa.Table:
    columns = {name: [getattr(letter, name) for letter in letters] for name in DEAD_LETTER_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=DEAD_LETTER_SCHEMA)


def send_dead_letters(producer: Producer, topic: str, letters: list[DeadLetter], timeout_s: float) -> None:
    """Send ``letters`` to the dead-letter topic and wait until the broker has them all; raises
    :class:`ingest.clients.ClientError` when one was not acknowledged.

    At least once: a crash after this and before the batch lands sends them again on the retry.
    """
    for letter in letters:
        producer.send(topic, value=letter.raw, key=letter.key, headers=letter.headers())
    failures = producer.flush(timeout_s)
    if failures:
        raise ClientError(f"{len(failures)} of {len(letters)} dead letters to {topic} were not "
                          f"acknowledged; first error: {failures[0]!r}")
