"""The streaming leg of ``make demo``, in process, on its own embedded broker."""

from __future__ import annotations

import pytest

from ingest.demo import streaming_leg

pytestmark = pytest.mark.slow


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
