"""The operator files in deploy/ checked against the code they drive: every manifest parses; every
``sirenfeed`` command line in them is accepted by the real command (its parser and config schema;
``sirenfeed train`` through its dry run); every metric and label the dashboard, the scrape config,
the alert rules and the README name is one the code exports, and the rules the scrape config loads
alert on the serving model's age and on refusals in a row; the exit codes a scheduler treats as
success are exactly the retraining's non-failures; the multi-node Job's pieces agree on the world's shape.
Nothing here starts Spark, a broker or a launcher."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from common import config as config_module
from common.repo import REPO_ROOT
from features.schema import load_schema
from features.settings import parse_job_arguments
from ingest.metrics import IngestMetrics
from lifecycle.cycle import (
    FAILED, INSUFFICIENT_EVIDENCE, LOCKED, NOT_PUBLISHED, NOTHING_NEW, PUBLISHED,
)
from lifecycle.telemetry import FreshnessTelemetry
from sirenfeed import cli
from trainer.telemetry import TrainerTelemetry

DEPLOY = REPO_ROOT / "deploy"
README = DEPLOY / "README.md"
DASHBOARD = DEPLOY / "grafana" / "sirenfeed-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
CRONJOB = DEPLOY / "k8s" / "retrain-cronjob.yaml"
TRAIN_JOB = DEPLOY / "k8s" / "train-multinode-job.yaml"
SERVICE_UNIT = DEPLOY / "systemd" / "sirenfeed-retrain.service"
TIMER_UNIT = DEPLOY / "systemd" / "sirenfeed-retrain.timer"
CRON = DEPLOY / "cron" / "sirenfeed-retrain.cron"
PACKAGES = ("common", "features", "ingest", "trainer", "lifecycle", "sirenfeed")

BAD_CONFIGURATION = 2  # what `sirenfeed` returns for a ConfigError
NON_FAILURES = {NOT_PUBLISHED, NOTHING_NEW, LOCKED, INSUFFICIENT_EVIDENCE}
EXIT_CODES = {PUBLISHED, FAILED, BAD_CONFIGURATION} | NON_FAILURES
INDEX_PLACEHOLDER = "$(JOB_COMPLETION_INDEX)"
TARGET_LABELS = {"instance", "job"}
"""Labels Prometheus itself attaches to every scraped series."""

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
TEXT_FILES = sorted(path for path in DEPLOY.rglob("*") if path.is_file())


def relative(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def manifest(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [document for document in yaml_documents(path) if document["kind"] == kind]
    return found


# --- every file parses --------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=relative)
def test_yaml_parses_into_mappings(path):
    documents = yaml_documents(path)
    assert documents and all(isinstance(document, dict) for document in documents)
    if path.parent.name == "k8s":
        for document in documents:
            assert {"apiVersion", "kind", "metadata"} <= document.keys() and document["metadata"]["name"]


def test_dashboard_is_importable_json_with_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [item for item in dashboard["templating"]["list"] if item["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"].strip(), panel["title"]


# --- metrics: what the code defines -------------------------------------------------------------

METRIC_TYPES = ("Counter", "Gauge", "Histogram", "Summary")
SERIES_SUFFIXES = {"Counter": ("_total", "_created"), "Gauge": ("",),
                   "Histogram": ("_bucket", "_count", "_sum", "_created"),
                   "Summary": ("_count", "_sum", "_created")}
"""The series prometheus_client exposes for one metric of each type."""


def string_value(node: ast.AST | None, names: dict[str, Any]) -> Any:
    """The string (or tuple of strings) ``node`` stands for, names looked up in ``names``; None
    where it cannot be known without running the code."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.JoinedStr):
        parts = [string_value(part.value if isinstance(part, ast.FormattedValue) else part, names)
                 for part in node.values]
        return "".join(parts) if all(isinstance(part, str) for part in parts) else None
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [string_value(item, names) for item in node.elts]
        return tuple(items) if all(isinstance(item, str) for item in items) else None
    return None


def argument(call: ast.Call, position: int, keyword: str) -> ast.AST | None:
    for item in call.keywords:
        if item.arg == keyword:
            return item.value
    return call.args[position] if len(call.args) > position else None


def bindings(tree: ast.Module, function: ast.FunctionDef | None,
              constants: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The parameter values of every call of ``function`` in its module: the metric helpers of
    trainer/telemetry.py build names from their parameters."""
    if function is None:
        return
    parameters = [argument.arg for argument in function.args.args]
    defaults = dict(zip(reversed(parameters), reversed(function.args.defaults)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function.name:
            given = {**defaults, **dict(zip(parameters, node.args)),
                     **{item.arg: item.value for item in node.keywords}}
            yield {name: string_value(value, constants) for name, value in given.items()}


def defined_metrics() -> dict[str, set[str]]:
    """Exposed series name → label names, for every prometheus_client metric our packages construct."""
    series: dict[str, set[str]] = {}
    unresolved = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            imported = {alias.asname or alias.name for node in ast.walk(tree)
                        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
                        for alias in node.names if alias.name in METRIC_TYPES}
            constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                         and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                         for target in node.targets if isinstance(target, ast.Name)}
            parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
            for call in ast.walk(tree):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and call.func.id in imported):
                    continue
                enclosing = parents.get(call)
                while enclosing is not None and not isinstance(enclosing, ast.FunctionDef):
                    enclosing = parents.get(enclosing)
                definitions = []
                for binding in [{}, *bindings(tree, enclosing, constants)]:
                    names = {**constants, **binding}
                    name = string_value(argument(call, 0, "name"), names)
                    labels_node = argument(call, 2, "labelnames")
                    labels = () if labels_node is None else string_value(labels_node, names)
                    if isinstance(name, str) and labels is not None:
                        definitions.append((name, labels))
                if not definitions:
                    unresolved.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}")
                for name, labels in definitions:
                    kind = call.func.id
                    base = name.removesuffix("_total") if kind == "Counter" else name
                    for suffix in SERIES_SUFFIXES[kind]:
                        series[base + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    assert not unresolved, f"metric definitions this test cannot read: {unresolved}"
    return series


METRICS = defined_metrics()
METRIC_NAME = re.compile(r"\bsirenfeed_[a-z0-9_]*[a-z0-9]\b(?!\.prom)")
"""A metric name in prose or PromQL (not ``sirenfeed_retrain.prom``, the text file, nor a
``sirenfeed_published_*`` family)."""


def test_the_metric_scan_finds_every_metric_the_components_register(tmp_path):
    registries = [IngestMetrics().registry, TrainerTelemetry(load_schema("feed").label_columns, port=0).registry,
                  FreshnessTelemetry(tmp_path).registry]
    exposed = {"counter": SERIES_SUFFIXES["Counter"], "gauge": SERIES_SUFFIXES["Gauge"],
               "histogram": SERIES_SUFFIXES["Histogram"]}
    registered = {family.name + suffix for registry in registries for family in registry.collect()
                  for suffix in exposed[family.type]}
    assert registered and registered <= METRICS.keys()


@pytest.mark.parametrize("path", TEXT_FILES, ids=relative)
def test_every_metric_named_in_deploy_files_is_defined(path):
    named = set(METRIC_NAME.findall(path.read_text()))
    assert named <= METRICS.keys(), f"not defined in the code: {sorted(named - METRICS.keys())}"


def promql_labels(expr: str) -> set[str]:
    grouped = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    matched = re.findall(r"\{([^}]*)\}", expr)
    return ({label.strip() for group in grouped for label in group.split(",") if label.strip()}
            | {label for matchers in matched for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)})


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.mark.parametrize("title, target", dashboard_targets(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_dashboard_queries_use_defined_metrics_and_their_labels(title, target):
    expr = target["expr"]
    names = set(METRIC_NAME.findall(expr))
    assert names and names <= METRICS.keys(), f"{title}: not defined: {sorted(names - METRICS.keys())}"
    available = set().union(*(METRICS[name] for name in names)) | TARGET_LABELS
    used = promql_labels(expr) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    assert used <= available, f"{title}: labels {sorted(used - available)} are not labels of {sorted(names)}"


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_the_scrape_config_loads_the_alert_rules():
    rule_files = yaml.safe_load(PROMETHEUS.read_text())["rule_files"]
    assert [PROMETHEUS.parent / path for path in rule_files] == [ALERTS]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_rules_use_defined_metrics_and_their_labels(rule):
    assert {"alert", "expr", "labels", "annotations"} <= rule.keys() and rule["labels"]["severity"]
    names = set(METRIC_NAME.findall(rule["expr"]))
    assert names and names <= METRICS.keys(), f"not defined: {sorted(names - METRICS.keys())}"
    available = set().union(*(METRICS[name] for name in names)) | TARGET_LABELS
    used = promql_labels(rule["expr"]) | set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
    assert used <= available, f"labels {sorted(used - available)} are not labels of {sorted(names)}"


def test_alerts_fire_on_an_old_serving_model_and_on_refusals_in_a_row():
    exprs = [rule["expr"] for rule in alert_rules()]
    age = re.compile(r"^time\(\) - sirenfeed_published_timestamp_seconds > [\d\s*]+$")
    refusals = re.compile(r"^sirenfeed_retrain_consecutive_refusals >= \d+$")
    assert any(age.match(expr) for expr in exprs) and any(refusals.match(expr) for expr in exprs), exprs


def test_staleness_is_computed_at_query_time_from_the_published_timestamp():
    exprs = [target["expr"] for _, target in dashboard_targets()]
    assert "time() - sirenfeed_published_max_event_timestamp_seconds" in exprs
    assert not any("sirenfeed_published_freshness_seconds" in expr for expr in exprs)


# --- command lines ------------------------------------------------------------------------------

COMMAND = re.compile(r"(?:^|&&|;|\{|\bexec)\s*(?:\S*/)?sirenfeed\s+(?P<rest>[a-z].*)")
"""``sirenfeed`` (or a path to it) in command position."""
SHELL_OPERATOR = set("();<>|&")


def logical_lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\\\n", " ").splitlines()]


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def commands_in_shell_text(text: str) -> list[list[str]]:
    """The argument lists (after ``sirenfeed``) of the commands in shell text, comments skipped."""
    commands = []
    for line in logical_lines(text.replace(INDEX_PLACEHOLDER, "JOB_COMPLETION_INDEX")):
        if line.startswith("#"):
            continue
        for match in COMMAND.finditer(line):
            lexer = shlex.shlex(match["rest"], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            argv = []
            for token in lexer:
                if set(token) <= SHELL_OPERATOR:
                    break
                argv.append(INDEX_PLACEHOLDER if token == "JOB_COMPLETION_INDEX" else token)
            commands.append(argv)
    return commands


def pod_specs(document: Any) -> Iterator[dict[str, Any]]:
    if isinstance(document, dict):
        if "containers" in document:
            yield document
        for value in document.values():
            yield from pod_specs(value)
    elif isinstance(document, list):
        for item in document:
            yield from pod_specs(item)


def commands_in_manifest(path: Path) -> list[list[str]]:
    commands = []
    for document in yaml_documents(path):
        for container in [container for pod in pod_specs(document) for container in pod["containers"]]:
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]):
                commands += commands_in_shell_text(argv[2])
            elif argv and Path(argv[0]).name == "sirenfeed":
                commands.append(argv[1:])
    return commands


def commands_in(path: Path) -> list[list[str]]:
    if path.suffix in (".yaml", ".yml"):
        return commands_in_manifest(path)
    text = path.read_text()
    return commands_in_shell_text("\n".join(code_blocks(text)) if path.suffix == ".md" else text)


COMMANDS = [(path, argv) for path in TEXT_FILES for argv in commands_in(path)]


def command_id(value: Any) -> str:
    return relative(value) if isinstance(value, Path) else " ".join(value[:2])


@pytest.mark.parametrize("path", [CRON, SERVICE_UNIT, CRONJOB, TRAIN_JOB, README], ids=relative)
def test_the_commands_of_each_file_are_found(path):
    assert [argv for found, argv in COMMANDS if found == path]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def mounted_configmaps(tmp_path: Path) -> dict[str, Path]:
    """Writes every ConfigMap of deploy/k8s/ under ``tmp_path`` at the path its pods mount it;
    returns mount path → that folder."""
    mounts = {}
    for path in DEPLOY.glob("k8s/*.yaml"):
        documents = yaml_documents(path)
        data = {document["metadata"]["name"]: document.get("data", {})
                for document in documents if document["kind"] == "ConfigMap"}
        for document in documents:
            for pod in pod_specs(document):
                volumes = {volume["name"]: volume["configMap"]["name"]
                           for volume in pod.get("volumes", []) if "configMap" in volume}
                for container in pod["containers"]:
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] in volumes:
                            folder = tmp_path / mount["mountPath"].lstrip("/")
                            folder.mkdir(parents=True, exist_ok=True)
                            for name, text in data[volumes[mount["name"]]].items():
                                (folder / name).write_text(text)
                            mounts[mount["mountPath"]] = folder
    return mounts


@pytest.fixture
def localized(tmp_path, monkeypatch):
    """Runs commands as the deploy files do, from the checkout, with the example paths moved:
    /opt/sirenfeed is this checkout, /srv/feed a temporary folder, ConfigMap mounts their data."""
    monkeypatch.chdir(REPO_ROOT)
    moves = {"/opt/sirenfeed": str(REPO_ROOT), "/srv/feed": str(tmp_path / "srv" / "feed"),
             **{mount: str(folder) for mount, folder in mounted_configmaps(tmp_path).items()}}

    def localize(argv: list[str]) -> list[str]:
        moved = []
        for token in argv:
            for example, local in moves.items():
                token = token.replace(example, local)
            moved.append(token)
        return moved

    return localize


def per_node(argv: list[str]) -> list[list[str]]:
    """One command per node where the index placeholder stands for the node's rank."""
    if INDEX_PLACEHOLDER not in argv:
        return [argv]
    nodes = int(option(argv, "--nodes"))
    return [[str(rank) if token == INDEX_PLACEHOLDER else token for token in argv] for rank in range(nodes)]


TRAIN_LAUNCHES = [(path, argv) for path, argv in COMMANDS
                  if argv[0] == "train" and "--continuous" not in argv]
CONFIGURED = [(path, argv) for path, argv in COMMANDS if (path, argv) not in TRAIN_LAUNCHES]


@pytest.mark.parametrize("path, argv", TRAIN_LAUNCHES, ids=command_id)
def test_train_commands_pass_the_dry_run(path, argv, localized, capsys):
    for node_argv in per_node(argv):
        assert cli.main([*localized(node_argv), "--dry-run"]) == 0, capsys.readouterr().err
        assert "# launcher" in capsys.readouterr().out


class Accepted(Exception):
    """Raised where the command would start working, once its configuration has loaded."""


@pytest.fixture
def stop_after_configuration(monkeypatch):
    """Every command loads its configuration through ``config_from_args`` after parsing its options;
    replaced (where defined and in every module of ours that imported it) by one that loads it and
    stops there."""
    real = config_module.config_from_args

    def load_and_stop(schema, args, **cli_values):
        raise Accepted(real(schema, args, **cli_values))

    ours = [module for name, module in list(sys.modules.items()) if name.split(".")[0] in PACKAGES]
    for module in ours:
        if getattr(module, "config_from_args", None) is real:
            monkeypatch.setattr(module, "config_from_args", load_and_stop)


@pytest.mark.parametrize("path, argv", CONFIGURED, ids=command_id)
def test_other_commands_pass_their_parser_and_config_schema(path, argv, localized,
                                                           stop_after_configuration, capsys):
    assert argv[0] in cli.COMMANDS
    with pytest.raises(Accepted):
        code = cli.main(localized(argv))
        pytest.fail(f"exit code {code}: {capsys.readouterr().err}")


# --- exit codes ---------------------------------------------------------------------------------

def unit_settings(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_systemd_counts_exactly_the_non_failures_as_success():
    service = unit_settings(SERVICE_UNIT)
    assert service["Type"] == "oneshot"
    assert {int(code) for code in service["SuccessExitStatus"].split()} == NON_FAILURES
    timer = unit_settings(TIMER_UNIT)
    assert timer["Persistent"] == "true" and timer["WantedBy"] == "timers.target"


def test_cronjob_maps_exactly_the_non_failures_to_success():
    cronjob = manifest(CRONJOB, "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    (mapped,) = re.findall(r'case "\$code" in ([0-9|]+)\) exit 0', container["args"][0])
    assert {int(code) for code in mapped.split("|")} == NON_FAILURES
    fail_at_once = [rule["onExitCodes"]["values"] for rule in job["podFailurePolicy"]["rules"]
                    if rule["action"] == "FailJob"]
    assert fail_at_once == [[BAD_CONFIGURATION]]


def test_readme_exit_code_table_matches_the_code():
    rows = re.findall(r"^\| (\d) \| .* \| (yes|no) \|$", README.read_text(), flags=re.MULTILINE)
    assert {int(code) for code, _ in rows} == EXIT_CODES and len(rows) == len(EXIT_CODES)
    assert {int(code) for code, failure in rows if failure == "no"} == NON_FAILURES | {PUBLISHED}


# --- the multi-node Job agrees with itself ------------------------------------------------------

def test_multinode_job_pieces_agree_on_the_world():
    job, service = manifest(TRAIN_JOB, "Job"), manifest(TRAIN_JOB, "Service")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (argv,) = commands_in_manifest(TRAIN_JOB)
    nodes, nproc = int(option(argv, "--nodes")), int(option(argv, "--nproc"))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert option(argv, "--node-rank") == INDEX_PLACEHOLDER
    host, port = option(argv, "--master").rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert service["metadata"]["name"] == pod["subdomain"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert int(port) in {item["port"] for item in service["spec"]["ports"]}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    hostfile = manifest(TRAIN_JOB, "ConfigMap")["data"][Path(option(argv, "--hostfile")).name]
    assert [line.split()[1] for line in hostfile.splitlines()] == [f"slots={nproc}"] * nodes


# --- scrape targets match the ports the commands open -------------------------------------------

SCRAPED_PORT_KEYS = {"sirenfeed-ingest": "metrics.port", "sirenfeed-trainer": "telemetry.port",
                     "sirenfeed-retrain": "telemetry_port"}


@pytest.mark.parametrize("job_name, key", SCRAPED_PORT_KEYS.items())
def test_scrape_targets_use_the_ports_the_commands_set(job_name, key):
    (scrape,) = [job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
                 if job["job_name"] == job_name]
    scraped = {target.rsplit(":", 1)[1] for group in scrape["static_configs"] for target in group["targets"]}
    opened = {token.split("=", 1)[1] for _, argv in COMMANDS for token in argv if token.startswith(f"{key}=")}
    assert opened and scraped == opened


# --- the README ---------------------------------------------------------------------------------

def test_readme_documents_every_deploy_file_and_names_only_existing_ones():
    text = README.read_text()
    undocumented = [relative(path) for path in TEXT_FILES if path != README and relative(path) not in text]
    assert not undocumented
    named = set(re.findall(r"\bdeploy/[\w./-]*\w", text))
    assert named and all((REPO_ROOT / path).exists() for path in named), sorted(named)


def spark_submit_examples() -> list[list[str]]:
    return [shlex.split(line) for block in code_blocks(README.read_text())
            for line in logical_lines(block) if line.startswith("deploy/spark-submit.sh ")]


@pytest.mark.parametrize("argv", spark_submit_examples(), ids=lambda argv: option(argv, "--master"))
def test_spark_submit_examples_reach_the_job_with_arguments_it_accepts(argv, tmp_path):
    """The wrapper runs for real up to ``spark-submit``, which is replaced by a script that records
    its arguments; the job's part of them goes through the job's own parser."""
    recorded = tmp_path / "spark-submit.args"
    fake = tmp_path / "bin" / "spark-submit"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(recorded))}\n')
    fake.chmod(0o755)
    # TMPDIR keeps the wrapper's zip folder in tmp_path: it execs spark-submit, so its EXIT trap
    # never removes the folder.
    environment = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
                   "TMPDIR": str(tmp_path)}
    subprocess.run(["bash", str(REPO_ROOT / argv[0]), *argv[1:]], cwd=REPO_ROOT, env=environment, check=True)
    submitted = recorded.read_text().splitlines()
    job_args = submitted[submitted.index(str(REPO_ROOT / "features" / "job.py")) + 1:]
    assert Path(option(submitted, "--py-files")).name == "features.zip"
    shipped_config = str(REPO_ROOT / "conf" / "features.yaml")
    assert option(submitted, "--files") == shipped_config
    cluster_mode = " --deploy-mode cluster " in f" {' '.join(argv)} "
    assert job_args[:2] == ["--config", "features.yaml" if cluster_mode else shipped_config]
    config = parse_job_arguments("features.job", "", ["--config", shipped_config, *job_args[2:]])
    given_to_job = argv[argv.index("--") + 1:]
    assert (config.raw, config.out) == (option(given_to_job, "--raw"), option(given_to_job, "--out"))
