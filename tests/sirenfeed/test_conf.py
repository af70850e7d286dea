"""Every YAML in conf/ mirrors its schema's defaults, so the dataclass stays the one home of each
default and a file that drifts from it (a renamed key, a stale value) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from features.settings import FeaturesConfig
from features.synth import SynthConfig
from ingest.config import IngestConfig
from lifecycle.cycle import RetrainConfig
from sirenfeed.cli import COMMANDS, main
from sirenfeed.demo import DemoConfig
from trainer.compare import CompareConfig
from trainer.config import TrainConfig
from trainer.evaluate import EvaluateConfig
from trainer.report import ReportConfig

CONF = Path(__file__).resolve().parents[2] / "conf"

# conf file -> (schema, the keys a command line must supply because they have no default)
SCHEMAS = {
    "synth.yaml": (SynthConfig, []),
    "features.yaml": (FeaturesConfig, ["raw=in", "out=out"]),
    "train.yaml": (TrainConfig, ["features=in", "run=out"]),
    "evaluate.yaml": (EvaluateConfig, ["run=out"]),
    "ingest.yaml": (IngestConfig, []),
    "demo.yaml": (DemoConfig, []),
    "retrain.yaml": (RetrainConfig, ["dir=state", "initial_run=run", "features.raw=in",
                                     "features.out=out"]),
    "compare.yaml": (CompareConfig, ["features=in", "out=out"]),
    "report.yaml": (ReportConfig, ["run=run"]),
}


def test_every_conf_file_has_a_schema():
    assert sorted(path.name for path in CONF.glob("*.yaml")) == sorted(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_conf_file_equals_schema_defaults(name):
    schema, required = SCHEMAS[name]
    assert load_config(schema, CONF / name, required) == load_config(schema, None, required)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_unknown_key_in_conf_file_is_named(name, tmp_path):
    schema, required = SCHEMAS[name]
    broken = tmp_path / name
    broken.write_text((CONF / name).read_text() + "\nno_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(schema, broken, required)


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["evaluate", "--run", "somewhere", "bins=zero"]) == 2
    assert "config key 'bins'" in capsys.readouterr().err
