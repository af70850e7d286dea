"""One-time setup run by ``make`` after installing, so that no later run pays for it:

- DeepSpeed's CPU shared-memory communication op, built into ``TORCH_EXTENSIONS_DIR``;
- the Spark feature job's class archive (:data:`features.spark.CLASS_ARCHIVE`): a small feature job
  runs in a JVM that writes the classes it loaded, parsed and verified, into a class-data-sharing
  archive when it exits; every later feature JVM on a local master maps it instead of loading them.
  Rebuilt on every install, since the archive is valid only for the pyspark jars and the JDK it was
  written with.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from features.full import run
from features.settings import FeaturesConfig, SparkConfig
from features.spark import CLASS_ARCHIVE, JIT_OPTIONS, QUIET_CLASS_SHARING, build_session
from features.synth import SynthConfig, write_synthetic_logs

logger = logging.getLogger(__name__)

ARCHIVE_JOB_USERS = 40
"""Users of the synthetic log the archive's job reads: enough for every stage, over in seconds."""


def build_deepspeed_op() -> None:
    import torch  # heavy: imported by the step that needs it

    if torch.cuda.is_available():
        logger.info("CUDA present: DeepSpeed uses NCCL, no CPU op to build")
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # heavy, as above

    logger.info("building DeepSpeed shm_comm into %s (once)", os.environ.get("TORCH_EXTENSIONS_DIR"))
    ShareMemCommBuilder().load(verbose=False)


def build_spark_class_archive(target: Path = CLASS_ARCHIVE) -> None:
    """Write the class archive ``target``, replacing it only once the JVM that dumps it has
    exited cleanly: a JVM that maps a torn archive crashes. A JDK that cannot dump one (no base
    archive) leaves the jobs without it, slower by a few percent, and is logged."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    logger.info("writing the Spark feature job's class archive %s (once per install)", target)
    with tempfile.TemporaryDirectory(prefix="sirenfeed-warmup-") as work:
        raw, out = Path(work, "raw"), Path(work, "features")
        write_synthetic_logs(SynthConfig(users=ARCHIVE_JOB_USERS, days=3), raw)
        spark_config = SparkConfig(master="local[2]", driver_memory="1g", shuffle_partitions=2, conf={
            "spark.ui.enabled": "false",
            "spark.driver.extraJavaOptions": f"{JIT_OPTIONS} -XX:ArchiveClassesAtExit={partial} {QUIET_CLASS_SHARING}"})
        spark = build_session(spark_config)
        jvm = spark.sparkContext._gateway.proc
        run(spark, FeaturesConfig(raw=str(raw), out=str(out), spark=spark_config))
        spark.stop()
        # The gateway JVM exits at the end of its stdin, and writes the archive before it does.
        jvm.stdin.close()
        code = jvm.wait()
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        logger.warning("the JVM wrote no class archive (exit code %s); feature jobs run without one", code)
        return
    os.replace(partial, target)
    logger.info("class archive written: %.0f MB", target.stat().st_size / 1e6)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    build_deepspeed_op()
    build_spark_class_archive()


if __name__ == "__main__":
    main()
