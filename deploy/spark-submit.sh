#!/usr/bin/env bash
# Submit the feature job to a Spark cluster.
#   deploy/spark-submit.sh --master yarn --deploy-mode cluster -- --raw hdfs:///feed/raw --out hdfs:///feed/features
# Options before `--` go to spark-submit, options after it to the job (e.g. --config, key=value overrides).
# The features package, the common helpers it imports and the shipped event schemas (conf/schemas)
# travel to the driver and executors as a zip (--py-files), at the paths features.schema reads.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
submit_args=()
while (($#)) && [[ "$1" != "--" ]]; do submit_args+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
zip_dir="$(mktemp -d)"
trap 'rm -rf "$zip_dir"' EXIT
(cd "$repo" && python3 - "$zip_dir/features.zip" <<'ZIP'
import pathlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as archive:
    for path in sorted([*pathlib.Path("common").rglob("*.py"), *pathlib.Path("features").rglob("*.py"),
                        *pathlib.Path("conf/schemas").glob("*.yaml")]):
        archive.write(path, path.as_posix())
ZIP
)
# In cluster deploy mode the driver runs on the cluster and finds the shipped config (--files) in its
# working directory; in client mode it reads the local file.
config="$repo/conf/features.yaml"
[[ " ${submit_args[*]} " == *" --deploy-mode cluster "* ]] && config="features.yaml"
# Not exec: the EXIT trap must still remove the zip once spark-submit returns.
spark-submit "${submit_args[@]}" --py-files "$zip_dir/features.zip" \
  --files "$repo/conf/features.yaml" \
  "$repo/features/job.py" --config "$config" "$@"
