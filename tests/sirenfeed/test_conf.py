"""conf/*.yaml is generated from the config schemas (``sirenfeed conf``), so the dataclass stays the
one home of each default and its explanation: every file loads to its schema's defaults, and a file
that drifts or a default changed without regenerating fails ``sirenfeed conf --check``. Every
command prints the configuration it resolved with ``--print-config``, before doing any work."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING, OmegaConf

from common.conf_files import render_defaults
from common.config import ConfigError, field_names, load_config
from features.movielens import MovieLensConfig
from features.settings import FeaturesConfig
from features.synth import SynthConfig
from ingest.config import IngestConfig
from lifecycle.config import RetrainConfig
from sirenfeed.cli import COMMANDS, main
from sirenfeed.conf import CONF_DIR, CONF_FILES, out_of_date
from sirenfeed.demo import DemoConfig
from trainer.compare import CompareConfig
from trainer.config import TrainConfig
from trainer.evaluate import EvaluateConfig
from trainer.report import ReportConfig

REQUIRED = {
    FeaturesConfig: ["raw=in", "out=out"],
    TrainConfig: ["features=in", "run=out"],
    EvaluateConfig: ["run=out"],
    RetrainConfig: ["dir=state", "initial_run=run", "features.raw=in", "features.out=out"],
    CompareConfig: ["features=in", "out=out"],
    ReportConfig: ["run=run"],
}
"""Schema -> the keys a command line must supply because they have no (valid) default."""


def required(schema: type) -> list[str]:
    return REQUIRED.get(schema, [])


def test_every_conf_file_has_a_schema():
    assert sorted(path.name for path in CONF_DIR.glob("*.yaml")) == sorted(CONF_FILES)


@pytest.mark.parametrize("name", sorted(CONF_FILES))
def test_conf_file_equals_schema_defaults(name):
    schema = CONF_FILES[name].schema
    assert load_config(schema, CONF_DIR / name, required(schema)) == load_config(schema, None, required(schema))


@pytest.mark.parametrize("name", sorted(CONF_FILES))
def test_unknown_key_in_conf_file_is_named(name, tmp_path):
    schema = CONF_FILES[name].schema
    broken = tmp_path / name
    broken.write_text((CONF_DIR / name).read_text() + "\nno_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(schema, broken, required(schema))


# --- generated from the schemas -----------------------------------------------------------------

def test_conf_check_finds_every_file_up_to_date(capsys):
    assert main(["conf", "--check"]) == 0, capsys.readouterr().err


def test_conf_check_detects_a_changed_schema_default(monkeypatch, capsys):
    monkeypatch.setattr(EvaluateConfig.__dataclass_fields__["bins"], "default", 30)
    assert main(["conf", "--check"]) == 1
    assert "conf/evaluate.yaml" in capsys.readouterr().err
    assert out_of_date() == ["evaluate.yaml"]


def test_conf_check_detects_an_edited_or_missing_file(tmp_path):
    for name in CONF_FILES:
        shutil.copy(CONF_DIR / name, tmp_path / name)
    assert out_of_date(tmp_path) == []
    train = tmp_path / "train.yaml"
    train.write_text(train.read_text().replace("  lr: 0.001\n", "  lr: 0.002\n"))
    (tmp_path / "report.yaml").unlink()
    assert out_of_date(tmp_path) == ["train.yaml", "report.yaml"]


@dataclass
class Inner:
    """A nested config without a field docstring is introduced by this one."""

    ratio: float = 2.0
    """A float stays a float."""
    tags: dict[str, int] = field(default_factory=lambda: {"a": 1})


@dataclass
class Example:
    path: str = MISSING
    """Required.

    An example, kept as written:

        path: /srv/data
    """
    inner: Inner = field(default_factory=Inner)
    names: list[str] = field(default_factory=lambda: ["x", "y"])
    """Short lists stay on one line; see :mod:`common.conf_files` and ``names``."""
    overrides: list[str] = field(default_factory=lambda: [f"section.key_{index}=value" for index in range(6)])
    """A list too long for one line is written in block style, and a docstring too long for one line is
    wrapped to the width of the file."""


EXAMPLE_YAML = """\
# example --config conf/example.yaml

# Required.
#
# An example, kept as written:
#
#     path: /srv/data
path: ???

# A nested config without a field docstring is introduced by this one.
inner:
  # A float stays a float.
  ratio: 2.0
  tags: {a: 1}

# Short lists stay on one line; see `common.conf_files` and `names`.
names: [x, y]
# A list too long for one line is written in block style, and a docstring too long for one line is
# wrapped to the width of the file.
overrides:
- section.key_0=value
- section.key_1=value
- section.key_2=value
- section.key_3=value
- section.key_4=value
- section.key_5=value
"""


def test_render_defaults_writes_docstrings_as_comments_and_round_trips(tmp_path):
    text = render_defaults(Example, "example --config conf/example.yaml")
    assert text == EXAMPLE_YAML
    rendered = tmp_path / "example.yaml"
    rendered.write_text(text)
    assert load_config(Example, rendered, ["path=p"]) == load_config(Example, None, ["path=p"])
    assert isinstance(load_config(Example, rendered, ["path=p"]).inner.ratio, float)


# --- the command line ---------------------------------------------------------------------------

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


PRINT_CONFIG = {
    "synth": (SynthConfig, ["--out", "raw"]),
    "features": (FeaturesConfig, ["--raw", "in", "--out", "out"]),
    "train": (TrainConfig, ["--features", "in", "--run", "out"]),
    "evaluate": (EvaluateConfig, ["--run", "out"]),
    "compare": (CompareConfig, ["--features", "in", "--out", "out"]),
    "report": (ReportConfig, ["--run", "run"]),
    "broker": (IngestConfig, []),
    "produce": (IngestConfig, ["--raw", "raw"]),
    "ingest": (IngestConfig, []),
    "retrain": (RetrainConfig, required(RetrainConfig)),
    "demo": (DemoConfig, []),
    "movielens": (MovieLensConfig, ["--out", "raw"]),
}
"""Every command that takes a configuration, with the options it cannot start without."""
TRAIN_MODES = {
    "train --continuous": (RetrainConfig, ["--continuous", *required(RetrainConfig)]),
    "train --resume-from": (TrainConfig, ["--resume-from", "latest", "--features", "in", "--run", "out"]),
}


def test_every_command_but_conf_takes_a_configuration():
    assert set(PRINT_CONFIG) == set(COMMANDS) - {"conf"}


@pytest.mark.parametrize("command", [*PRINT_CONFIG, *TRAIN_MODES])
def test_print_config_prints_the_resolved_configuration_and_exits(command, capsys):
    schema, options = {**PRINT_CONFIG, **TRAIN_MODES}[command]
    with pytest.raises(SystemExit) as stopped:
        main([command.split()[0], "--print-config", *options])
    assert stopped.value.code == 0, capsys.readouterr().err
    printed = OmegaConf.create(capsys.readouterr().out)
    assert list(printed) == field_names(schema)


def test_print_config_still_rejects_a_bad_configuration(capsys):
    assert main(["evaluate", "--print-config", "--run", "somewhere", "bins=zero"]) == 2
    captured = capsys.readouterr()
    assert "config key 'bins'" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv, key, expected", [
    (["broker", "--topics", "alpha", "beta"], ("broker", "topics"), ["alpha", "beta"]),
    (["compare", "--features", "f", "--out", "o", "--variants", "ordinal, siren"], ("variants",),
     ["ordinal", "siren"]),
    (["features", "--raw", "r", "--out", "o", "--incremental"], ("incremental", "enabled"), True),
    (["ingest", "--out", "landing", "--until-idle", "2.5"], ("consumer", "until_idle_s"), 2.5),
])
def test_command_options_reach_the_config_as_typed_values(argv, key, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print-config"])
    assert exit_info.value.code == 0
    printed = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    for part in key:
        printed = printed[part]
    assert printed == expected
