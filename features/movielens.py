"""``sirenfeed movielens --out RAW_DIR``: MovieLens-100K as raw events of the ``movielens`` schema.

The 100,000 ratings (943 users, 1,682 movies, 1997-09 to 1998-04) ship inside the ``recbole`` wheel
as RecBole atomic files (``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``). They are
read through the installed distribution's metadata (:func:`importlib.metadata.distribution`), never
by importing ``recbole`` (its import pulls in a training stack this project does not need). When it
is missing, the command installs the version pinned in ``constraints.txt`` into the running
interpreter's environment with ``pip install --no-deps`` (``--no-install`` refuses instead); the
data is never copied into the repository.

Each rating becomes one event of ``conf/schemas/movielens.yaml``: ``rating_id = u<user>-m<movie>``
(a user rates a movie once), ``user``, ``movie``, the movie's first ``genre`` (in the order of
MovieLens' genre flags; ``unknown`` without one) and release ``decade`` (``unknown`` without a year),
the user's ``occupation``, ``gender`` and ``age`` bucket (those of MovieLens-1M), ``ts`` (epoch
seconds) and the ``rating`` (1-5). The output is a raw dataset directory like the synthetic logs:
``date=YYYY-MM-DD/part-00000.parquet`` per UTC date of ``ts``, sorted by (user, time), with the
schema's ``raw_arrow_schema``, then ``_MANIFEST.json`` and ``_SUCCESS``
(:func:`features.dataset.write_manifest`), all written into a hidden sibling directory that replaces
``RAW_DIR`` in one rename.

Every event is checked against the schema before anything is written. The ratings predate the
contract's default epoch (2020-01-01), so they are checked, and must be read downstream, with
``contract.epoch_ms=0``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import importlib
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common.config import add_config_arguments, config_from_args
from common.files import staged_directory
from common.logs import configure_logging
from common.repo import REPO_ROOT
from features.dataset import check_replaceable, write_manifest
from features.schema import SCHEMA_VERSION, ContractConfig, EventSchema, load_schema
from features.validation import check_record

log = logging.getLogger(__name__)

DATASET_KIND = "movielens_raw_events"
"""``dataset`` entry of the manifest; a directory carrying it may be replaced by a re-run."""
SCHEMA_NAME = "movielens"
PACKAGE = "recbole"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
DATA_DIR = "recbole/dataset_example/ml-100k"
FILES = {"inter": "ml-100k.inter", "item": "ml-100k.item", "user": "ml-100k.user"}
"""The atomic files read: ratings, movies, users."""
EXPECTED_RATINGS = 100_000
CONTRACT = ContractConfig(epoch_ms=0)
"""The contract the ratings of 1997-98 pass: the default epoch (2020) would reject them all."""
AGE_BUCKETS = ((18, "under_18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
               (56, "50-55"))
"""(first age above the bucket, bucket); older users are ``56+`` (MovieLens-1M's buckets)."""


class MovieLensError(RuntimeError):
    """The MovieLens files cannot be found, installed or converted."""


@dataclass
class MovieLensConfig:
    """``sirenfeed movielens``."""

    install: bool = True
    """Install the ``recbole`` that constraints.txt pins (``pip install --no-deps``) when it is
    missing or another version; false fails instead, naming the command to run."""


# ---------------------------------------------------------------------------------------------
# Finding the files


def pinned_version(constraints: Path = CONSTRAINTS) -> str:
    """The version of ``recbole`` that ``constraints.txt`` pins."""
    match = re.search(rf"^{PACKAGE}==(\S+)", constraints.read_text(), flags=re.MULTILINE)
    if match is None:
        raise MovieLensError(f"{constraints} pins no {PACKAGE} version")
    return match.group(1)


def install_package(version: str) -> None:
    """``pip install --no-deps recbole==VERSION`` into the running interpreter's environment: only
    its data files are needed, not its dependencies."""
    log.info("installing %s==%s (--no-deps) for its MovieLens-100K files", PACKAGE, version)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", f"{PACKAGE}=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise MovieLensError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    importlib.invalidate_caches()  # so that metadata finds the distribution just installed


def locate_files(install: bool = True) -> dict[str, Path]:
    """The paths of :data:`FILES` in the installed ``recbole`` of the pinned version, installing it
    first when it is missing or another version (unless ``install`` is false)."""
    version = pinned_version()
    try:
        installed = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        if not install:
            found = f"version {installed}" if installed else "not installed"
            raise MovieLensError(f"{PACKAGE}=={version} is needed for its MovieLens-100K files ({found}); "
                                 f"run: {sys.executable} -m pip install --no-deps {PACKAGE}=={version}")
        install_package(version)
    distribution = metadata.distribution(PACKAGE)
    listed = {str(path).replace("\\", "/"): path for path in distribution.files or []}
    paths = {}
    for name, file_name in FILES.items():
        entry = listed.get(f"{DATA_DIR}/{file_name}")
        if entry is None:
            raise MovieLensError(f"{PACKAGE} {version} does not list {DATA_DIR}/{file_name}")
        paths[name] = Path(distribution.locate_file(entry))
        if not paths[name].is_file():
            raise MovieLensError(f"{paths[name]} is listed by {PACKAGE} {version} but missing")
    return paths


# ---------------------------------------------------------------------------------------------
# Converting


def read_atomic(path: Path) -> list[dict[str, str]]:
    """A RecBole atomic file: tab-separated, a header of ``name:type`` columns."""
    lines = path.read_text(encoding="utf-8").splitlines()
    names = [column.split(":", 1)[0] for column in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(names):
            raise MovieLensError(f"{path}:{number}: {len(values)} columns, the header has {len(names)}")
        rows.append(dict(zip(names, values)))
    return rows


def decade(release_year: str) -> str:
    """``1995`` → ``1990s``; the file's stand-ins for a missing year (``unkonwn``, ``V``) → ``unknown``."""
    if not (release_year.isdigit() and len(release_year) == 4):
        return "unknown"
    return f"{int(release_year) // 10 * 10}s"


def first_genre(classes: str) -> str:
    genres = classes.split()
    return genres[0] if genres else "unknown"


def age_bucket(age: str) -> str:
    years = int(age)
    return next((bucket for above, bucket in AGE_BUCKETS if years < above), "56+")


def convert(paths: dict[str, Path], schema: EventSchema) -> pa.Table:
    """Every rating as a raw event of ``schema``, sorted by (user, time, rating id)."""
    movies = {row["item_id"]: row for row in read_atomic(paths["item"])}
    users = {row["user_id"]: row for row in read_atomic(paths["user"])}
    events = []
    for rating in tqdm(read_atomic(paths["inter"]), desc="movielens", unit="rating", mininterval=1.0):
        user, movie = rating["user_id"], rating["item_id"]
        if movie not in movies or user not in users:
            raise MovieLensError(f"rating of movie {movie} by user {user}: no such "
                                 f"{'movie' if movie not in movies else 'user'} in {paths['item'].parent}")
        about_movie, about_user = movies[movie], users[user]
        events.append({
            "rating_id": f"u{user}-m{movie}", "user": user, "movie": movie,
            "genre": first_genre(about_movie["class"]), "decade": decade(about_movie["release_year"]),
            "occupation": about_user["occupation"], "gender": about_user["gender"],
            "age": age_bucket(about_user["age"]),
            # Typed float by RecBole, written as integers.
            "ts": int(float(rating["timestamp"])), "rating": int(float(rating["rating"])),
        })
    table = pa.Table.from_pylist(events, schema=schema.raw_arrow_schema)
    order = pc.sort_indices(table, sort_keys=[("user", "ascending"), ("ts", "ascending"),
                                              ("rating_id", "ascending")])
    return table.take(order)


def check_events(table: pa.Table, schema: EventSchema) -> None:
    """Refuse a conversion with events the schema rejects or an event id twice."""
    reasons = collections.Counter(check_record(record, schema, CONTRACT) for record in table.to_pylist())
    reasons.pop(None, None)
    if reasons:
        raise MovieLensError(f"converted events fail schema '{schema.name}': {dict(reasons)}")
    ids = table.column("rating_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise MovieLensError("two ratings share a rating_id")


# ---------------------------------------------------------------------------------------------
# Writing


def write_movielens(out: str | Path, paths: dict[str, Path] | None = None,
                    install: bool = True) -> dict[str, Any]:
    """Convert MovieLens-100K into the raw dataset ``out``, replacing it atomically; returns the
    manifest. ``paths`` defaults to the files of the pinned ``recbole`` (:func:`locate_files`,
    which installs it unless ``install`` is false)."""
    target = Path(out)
    check_replaceable(target, DATASET_KIND, "MovieLens events")
    shipped = paths is None
    paths = paths or locate_files(install)
    schema = load_schema(SCHEMA_NAME)
    table = convert(paths, schema)
    check_events(table, schema)
    ts = table.column("ts")
    day = pc.strftime(pc.cast(pc.multiply(ts, 1000), pa.timestamp("ms", tz="UTC")), format="%Y-%m-%d")
    dates: dict[str, int] = {}
    with staged_directory(target) as staging:
        for date in sorted(set(day.to_pylist())):
            rows = table.filter(pc.equal(day, date))
            directory = staging / f"date={date}"
            directory.mkdir()
            pq.write_table(rows, directory / "part-00000.parquet")
            dates[date] = rows.num_rows
        manifest = {
            "dataset": DATASET_KIND,
            "schema_version": SCHEMA_VERSION,
            "schema": schema.to_dict(),
            "source": {"package": f"{PACKAGE}=={pinned_version()}", "files": {
                name: {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                for name, path in paths.items()}},
            "contract": {"epoch_ms": CONTRACT.epoch_ms},
            "events": table.num_rows,
            "users": pc.count_distinct(table.column("user")).as_py(),
            "movies": pc.count_distinct(table.column("movie")).as_py(),
            "dates": dates,
            "first_event_ms": pc.min(ts).as_py() * 1000,
            "watermark_ms": pc.max(ts).as_py() * 1000,
        }
        write_manifest(staging, manifest)
    log.info("wrote %d MovieLens-100K events of %d users over %d dates to %s",
             manifest["events"], manifest["users"], len(dates), target)
    if shipped and manifest["events"] != EXPECTED_RATINGS:
        log.warning("MovieLens-100K has %d ratings, not %d", manifest["events"], EXPECTED_RATINGS)
    return manifest


# ---------------------------------------------------------------------------------------------
# Command


def main(argv: list[str]) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="sirenfeed movielens", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="RAW_DIR", help="output directory")
    parser.add_argument("--no-install", action="store_true",
                        help=f"fail instead of installing the pinned {PACKAGE} (install=false)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(MovieLensConfig, args, install=False if args.no_install else None)
    try:
        manifest = write_movielens(args.out, install=config.install)
    except (MovieLensError, FileExistsError) as error:
        log.error("%s", error)
        return 2
    def utc(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat()

    rows = [("events", manifest["events"]), ("users", manifest["users"]), ("movies", manifest["movies"]),
            ("dates", len(manifest["dates"])), ("first", utc(manifest["first_event_ms"])),
            ("watermark", utc(manifest["watermark_ms"]))]
    print("\n".join(f"{name:<10} {value}" for name, value in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
