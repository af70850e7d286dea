"""``sirenfeed features --raw RAW_DIR --out FEATURES_DIR [--incremental] [--config FILE] [key=value ...]``.

Validates the configuration, then runs the feature job (:mod:`features.job`) through the
``spark-submit`` that ships with the installed pyspark, on ``spark.master`` (default ``local[*]``),
with the packages the job imports (:data:`JOB_PACKAGES`) zipped on the fly and passed with
``--py-files`` so that executors on a cluster can import them. The job's log streams to stderr
(into the file of a :func:`common.logs.output_to` block when one is open, as in the demo's steps);
the exit code is the job's (5: another
incremental run holds the dataset's lock, :mod:`features.incremental`); on success the dataset
summary (:func:`features.summary.describe`) goes to stdout. ``spark-submit`` runs in a process group
of its own that dies with this command, SIGKILL included, and receives its SIGINT and SIGTERM
(:func:`common.concurrency.process_group`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pyspark

from common.concurrency import EXIT_LOCKED, process_group
from common.config import ConfigError, to_yaml
from common.logs import child_output
from features.settings import FeaturesConfig, parse_job_arguments
from features.spark import session_settings
from features.spec import FeatureSpec
from features.summary import describe

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
JOB_SCRIPT = PACKAGE_DIR / "job.py"
JOB_PACKAGES = ("common", "features")
"""The packages the job imports, shipped to the driver and executors as one zip (``--py-files``)."""
SCHEMA_FILES = "conf/schemas"
"""The shipped event schemas, zipped with the packages (``features.schema`` reads them from there)."""


def spark_submit_executable() -> Path:
    return Path(pyspark.__file__).resolve().parent / "bin" / "spark-submit"


def build_package_zip(target: Path) -> Path:
    """Zip the packages of :data:`JOB_PACKAGES` (their ``.py`` files) and the shipped schemas
    (:data:`SCHEMA_FILES`) for ``--py-files``."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for package in JOB_PACKAGES:
            for source in sorted((PACKAGE_DIR.parent / package).glob("*.py")):
                archive.write(source, f"{package}/{source.name}")
        for source in sorted((PACKAGE_DIR.parent / SCHEMA_FILES).glob("*.yaml")):
            archive.write(source, f"{SCHEMA_FILES}/{source.name}")
    return target


def spark_submit_command(config: FeaturesConfig, package_zip: Path, config_file: Path,
                         script: Path = JOB_SCRIPT) -> list[str]:
    settings = session_settings(config.spark)
    driver_memory = settings.pop("spark.driver.memory")
    command = [str(spark_submit_executable()), "--master", config.spark.master,
               "--driver-memory", driver_memory, "--name", "sirenfeed-features",
               "--py-files", str(package_zip)]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    return command + [str(script), "--config", str(config_file)]


def write_job_files(config: FeaturesConfig, folder: Path) -> tuple[Path, Path]:
    """The package zip and the resolved config a submission needs, written into ``folder``.

    The job reads exactly the configuration validated here, defaults and overrides resolved, the
    event schema included: a schema file given by path need not exist where the driver runs."""
    config_file = folder / "features.yaml"
    config_file.write_text(to_yaml(dataclasses.replace(config, spec=FeatureSpec(**config.spec.record()))))
    return build_package_zip(folder / "features.zip"), config_file


def job_environment() -> dict[str, str]:
    """This process's environment, with the driver's and workers' Python defaulting to this one."""
    environment = {**os.environ}
    environment.setdefault("PYSPARK_PYTHON", sys.executable)
    environment.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return environment


def run_job(config: FeaturesConfig) -> int:
    """Submit the job and stream its log to stderr, or to the file of an open
    :func:`common.logs.output_to`; returns ``spark-submit``'s exit code."""
    with tempfile.TemporaryDirectory(prefix="sirenfeed-features-") as work:
        command = spark_submit_command(config, *write_job_files(config, Path(work)))
        logger.info("running %s", " ".join(command))
        with process_group(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=job_environment()) as process:
            assert process.stdout is not None
            # stdout stays free for the summary.
            sink = child_output() or sys.stderr
            for line in process.stdout:
                sink.write(line)
                sink.flush()
        return process.returncode


def main(argv: list[str]) -> int:
    try:
        config = parse_job_arguments("sirenfeed features", __doc__.splitlines()[0], argv)
    except ConfigError as error:
        print(f"sirenfeed features: {error}", file=sys.stderr)
        return 2
    returncode = run_job(config)
    if returncode == EXIT_LOCKED:
        logger.error("another incremental feature job holds the lock of %s: nothing was done", config.out)
        return returncode
    if returncode != 0:
        logger.error("the feature job failed (spark-submit exit code %d); %s is unchanged",
                     returncode, config.out)
        return returncode
    if "://" in config.out and not config.out.startswith("file://"):
        logger.info("wrote %s (the summary reads local datasets only)", config.out)
    else:
        print(describe(config.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
