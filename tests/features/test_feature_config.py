"""The feature job's configuration: conf/features.yaml mirrors the defaults, and bad keys or values fail
before any Spark starts, naming the key; the job's zip carries the shipped schemas."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.config import ConfigError, load_config, to_dict
from common.repo import REPO_ROOT
from features.schema import load_schema, shipped_schemas
from features.settings import FeaturesConfig
from features.submit import build_package_zip

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


def test_a_schema_is_chosen_by_name_and_keeps_its_own_tables():
    """The defaults carry the feed's table sizes; under another schema those are not overrides."""
    watch = load_config(FeaturesConfig, None, ["raw=in", "out=out", "spec.schema=watch", "spec.buckets.post_id=1009"])
    assert watch.spec.event_schema.name == "watch"
    assert watch.spec.buckets == {"post_id": 1009, "creator_id": 5003, "format": 8, "country": 257}
    with pytest.raises(ConfigError, match="'spec.buckets.item_id'.*not a table of schema 'watch'"):
        load_config(FeaturesConfig, None, ["raw=in", "out=out", "spec.schema=watch", "spec.buckets.item_id=97"])
    with pytest.raises(ConfigError, match="spec.schema.*no schema file"):
        load_config(FeaturesConfig, None, ["raw=in", "out=out", "spec.schema=nonesuch"])


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


def test_the_job_zip_carries_the_shipped_schemas(tmp_path):
    """A driver imports the packages from the ``--py-files`` zip, beside no repository: the schemas
    load from the zip (an empty folder as cwd, the zip first on the path)."""
    archive = build_package_zip(tmp_path / "features.zip")
    code = ("import features.schema as s; assert '.zip' in s.__file__; "
            "print(' '.join(s.shipped_schemas()), s.load_schema('watch').fingerprint)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(archive), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [*shipped_schemas(), load_schema("watch").fingerprint]
