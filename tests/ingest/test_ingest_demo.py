"""The streaming leg of ``make demo``, in process, on its own embedded broker; and its corpus of
malformed messages, for every shipped schema."""

from __future__ import annotations

import pytest

from common.config import load_config
from features.schema import ContractConfig, load_schema, shipped_schemas
from features.synth import SynthConfig, write_synthetic_logs
from features.validation import check_message
from ingest.demo import bad_messages, streaming_leg
from ingest.producer import event_messages, raw_dates, read_day


@pytest.mark.slow
def test_streaming_leg_lands_the_last_day_exactly_once(raw_dir, raw_messages, tmp_path):
    result = streaming_leg(raw_dir, tmp_path)
    last_day = raw_messages[max(raw_messages)]
    assert result["exactly_once"]
    assert result["produced"] - len(last_day) >= 10  # the injected corpus of malformed messages
    assert result["landed"] == result["valid"] == result["ingest"]["landed"]
    assert result["produced"] == result["valid"] + result["dead_lettered_total"]
    assert len(result["dead_lettered"]) >= 10  # the injected corpus, one reason per kind at least
    assert result["files"] > 0 and result["freshness_s"] > 0
    assert "exactly once" in result["summary"]
    assert (tmp_path / "landing").is_dir() and not (tmp_path / "broker" / "broker.json").exists()


@pytest.mark.parametrize("name", shipped_schemas())
def test_each_malformed_message_fails_with_its_reason(name, tmp_path):
    schema, contract = load_schema(name), ContractConfig()
    write_synthetic_logs(load_config(SynthConfig, overrides=[f"schema={name}", "users=3", "days=1",
                                                             "bad_fraction=0"]), tmp_path)
    files = next(iter(raw_dates(tmp_path).values()))
    _, raw = next(event_messages(read_day(files, schema), schema))
    template, reason = check_message(raw, schema, contract)
    assert reason is None
    corpus = bad_messages(template, schema, contract)
    assert {expected: check_message(raw, schema, contract)[1] for expected, raw in corpus} == \
        {expected: expected for expected, _ in corpus}
    kinds = {expected.split(":")[0] for expected, _ in corpus}
    assert len(kinds) >= 10 and f"empty:{schema.config.user}" in dict(corpus)
    assert ("not_allowed" in kinds) == any(field.values for field in schema.fields)
