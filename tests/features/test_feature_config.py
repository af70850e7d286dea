"""The feature job's configuration: conf/features.yaml mirrors the defaults, and bad keys or values fail
before any Spark starts, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.config import ConfigError, load_config, to_dict
from common.repo import REPO_ROOT
from features.settings import FeaturesConfig

CONF = REPO_ROOT / "conf" / "features.yaml"


def test_yaml_mirrors_the_defaults():
    loaded = load_config(FeaturesConfig, CONF, ["raw=in", "out=out"])
    assert to_dict(loaded) == to_dict(FeaturesConfig(raw="in", out="out"))


@pytest.mark.parametrize(("override", "key"), [
    ("spark.bogus=1", "spark.bogus"),
    ("spec.stride=0", "spec.stride"),
    ("eval_days=-1", "eval_days"),
    ("train_files=many", "train_files"),
    ("spark.driver_memory=lots", "spark.driver_memory"),
    ("spark.conf={executor.memory: 4g}", "spark.conf.executor.memory"),
    ("contract.max_string_len=0", "contract.max_string_len"),
    ("out=in/features", "out"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(FeaturesConfig, CONF, ["raw=in", "out=out", override])


def test_raw_and_out_are_required():
    with pytest.raises(ConfigError, match="out, raw"):
        load_config(FeaturesConfig, CONF)


@pytest.mark.parametrize("module", ["features.submit", "features.job"])
def test_commands_reject_bad_config_before_spark_starts(module, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", module, "--raw", str(tmp_path), "--out", str(out), "spark.shuffle_partitions=0",
         "nonsense=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'nonsense'" in result.stderr
    # Spark's first words on start-up; a config error must come before any of them.
    assert not any(word in result.stderr for word in ("log4j", "log level", "SparkContext"))
    assert not out.exists()
