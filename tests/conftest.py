"""Environment every test needs, set before Spark, torch or DeepSpeed start."""

import os
import sys

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tiny feature datasets and training runs the trainer's and the lifecycle's tests share.
pytest_plugins = ["training_fixtures"]
