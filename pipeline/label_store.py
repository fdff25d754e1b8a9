"""The Parquet label store: pseudo-labels of one round, readable by plain pyarrow.

Layout of a store (a local folder or an ``s3://`` prefix)::

    <store>/predictions/part-00000.parquet   generator output, images [0, P) in canonical order
    <store>/predictions/part-00001.parquet   images [P, 2P) ...
    <store>/labels/part-00000.parquet        selected pseudo-labels, same images and order
    <store>/manifest.json                    written last: the store is complete iff it exists

``predictions`` rows (one per image) — enough to re-select with other thresholds
without running the model again:

    index        int32   position in the labelling order (name-sorted, or the released permutation)
    name         string  image name (file stem)
    image        string  image URI
    height,width int32   size of the maps (the pseudo-label size)
    prediction   binary  argmax, uint8 [height*width], row-major
    confidence   binary  max softmax probability, float16 little-endian [height*width]
    class_pixels list<int64>[K]  pixels predicted as each class
    ground_truth binary  train-id labels (uint8, 255 ignore) resized to the map size, or
                         null; used only for pseudo-label precision statistics
    histogram_cells, histogram_counts  binary  int32 little-endian: the non-empty cells of the
                         image's per-class histogram of its float16 confidences (selectors.
                         sparse_histogram), made by the labelling actor; the selection reads
                         these alone for its thresholds

``labels`` rows:

    index, name, image, height, width   as above
    label        binary  pseudo-label, uint8 [height*width], 255 = not selected
    thresholds   list<float32>[K]  per-class thresholds applied to this image
    class_pixels list<int64>[K]    pixels predicted as each class
    class_kept   list<int64>[K]    pixels kept (selected) for each class
    class_correct list<int64>[K]   kept pixels that agree with ground truth, or null

Binary columns are raw little-endian arrays, compressed by Parquet (zstd); decode with
``np.frombuffer(row["label"], np.uint8).reshape(height, width)``. The dataset-level
metadata (generator checkpoint, selector and its parameters, config hash, round, ...)
is in ``manifest.json`` and in each file's schema metadata under ``iast``.

Atomicity: every part is written to a temporary name and renamed (a single PUT on S3),
and ``manifest.json`` is written only after all parts, so a crash, an unreachable
storage or a full disk leaves no complete-looking store and no part that looks
finished but is not; the failure is a ``storage.StorageError`` naming the part's URI.
Temporaries a failed write could not remove are removed by the commit. Prediction parts are the unit of resumption: a re-run keeps the parts
made with the same configuration hash and computes only the missing ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from pipeline import storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
_META_KEY = b"iast"

PREDICTION_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),
        ("name", pa.string()),
        ("image", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("prediction", pa.binary()),
        ("confidence", pa.binary()),
        ("class_pixels", pa.list_(pa.int64())),
        ("ground_truth", pa.binary()),
        ("histogram_cells", pa.binary()),
        ("histogram_counts", pa.binary()),
    ]
)
HISTOGRAM_COLUMNS = ["histogram_cells", "histogram_counts"]

LABEL_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),
        ("name", pa.string()),
        ("image", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("label", pa.binary()),
        ("thresholds", pa.list_(pa.float32())),
        ("class_pixels", pa.list_(pa.int64())),
        ("class_kept", pa.list_(pa.int64())),
        ("class_correct", pa.list_(pa.int64())),
    ]
)


@dataclass(frozen=True)
class PredictionRecord:
    """One image's generator output, decoded."""

    index: int
    name: str
    image: str
    prediction: np.ndarray  # uint8 (H, W)
    confidence: np.ndarray  # float16 (H, W)
    class_pixels: np.ndarray  # int64 (K,)
    ground_truth: np.ndarray | None  # uint8 (H, W) train ids


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


class LabelStore:
    """A label store at a local path or S3 URI (see the module docstring for the format)."""

    def __init__(self, uri: str):
        self.uri = storage.check_uri(uri).rstrip("/")
        self._fs, self._root = storage.arrow_filesystem(self.uri)

    # -- paths ---------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def _uri(self, path: str) -> str:
        return self.uri + path[len(self._root.rstrip("/")):]

    def _write_atomic(self, path: str, write) -> None:
        parent = path.rsplit("/", 1)[0]
        tmp = f"{parent}/{_TMP_PREFIX}{uuid.uuid4().hex}"
        with storage.failures_named("writing", self._uri(path)):
            try:
                self._fs.create_dir(parent, recursive=True)
                with self._fs.open_output_stream(tmp) as out:
                    write(out)
                self._fs.move(tmp, path)
            except BaseException:
                self._remove_quietly(tmp)
                raise

    def _remove_quietly(self, path: str) -> None:
        """Best effort: the storage that just failed may fail again, and that second
        error must not hide the first. A leftover temporary is never read, and
        ``commit`` removes it."""
        try:
            if self._exists(path):
                self._fs.delete_file(path)
        except OSError:
            pass

    def _remove_temporaries(self) -> None:
        """Temporaries of writes that failed after their data was stored (on S3 a move is
        a copy and a delete: the copy may succeed and the delete not)."""
        for folder in (self._path("predictions"), self._path("labels"), self._path()):
            for info in self._fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
                if info.base_name.startswith(_TMP_PREFIX):
                    self._fs.delete_file(info.path)

    # -- completeness ----------------------------------------------------------------
    def is_complete(self) -> bool:
        return self._exists(self._path(MANIFEST))

    def manifest(self) -> dict:
        path = self._path(MANIFEST)
        if not self._exists(path):
            raise FileNotFoundError(
                f"label store {self.uri} is not complete (no {MANIFEST}): run the "
                "pseudo-labelling job for it first"
            )
        with self._fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def commit(self, manifest: dict) -> None:
        """Mark the store complete. Call only after every label part is written."""
        data = json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2).encode()
        with storage.failures_named("cleaning up", self.uri):
            self._remove_temporaries()
        self._write_atomic(self._path(MANIFEST), lambda out: out.write(data))

    def invalidate(self) -> None:
        """Remove the commit mark (before labels are re-selected into this store)."""
        if self.is_complete():
            self._fs.delete_file(self._path(MANIFEST))

    # -- parts ------------------------------------------------------------------------
    def _write_part(self, kind: str, part: int, table: pa.Table, metadata: dict) -> None:
        meta = {_META_KEY: json.dumps(metadata, sort_keys=True).encode()}
        table = table.replace_schema_metadata(meta)
        self._write_atomic(
            self._path(kind, part_name(part)),
            lambda out: pq.write_table(table, out, compression="zstd", row_group_size=16),
        )

    def _part_schema(self, kind: str, part: int) -> pa.Schema | None:
        """The schema of a finished part, or None if the part is missing or unreadable."""
        path = self._path(kind, part_name(part))
        if not self._exists(path):
            return None
        try:
            with self._fs.open_input_file(path) as f:
                return pq.read_schema(f)
        except (OSError, pa.ArrowInvalid):
            return None  # a torn file from a crash: recompute it

    def write_predictions(self, part: int, rows: list[dict], metadata: dict) -> None:
        self._write_part("predictions", part, pa.Table.from_pylist(rows, PREDICTION_SCHEMA), metadata)

    def write_labels(self, part: int, rows: list[dict], metadata: dict) -> None:
        self._write_part("labels", part, pa.Table.from_pylist(rows, LABEL_SCHEMA), metadata)

    def finished_prediction_parts(self, num_parts: int, config_hash: str) -> set[int]:
        """Prediction parts already written by a run with the same configuration."""
        done = set()
        for part in range(num_parts):
            schema = self._part_schema("predictions", part)
            if schema is None or not set(HISTOGRAM_COLUMNS) <= set(schema.names):
                continue  # missing, torn, or written before the actors made histograms
            if json.loads((schema.metadata or {}).get(_META_KEY, b"{}")).get("config_hash") == config_hash:
                done.add(part)
        return done

    def part_histograms(self, part: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each image's sparse confidence histogram (cells, counts) in one prediction part,
        in canonical order: its histogram columns, without the maps."""
        with self._fs.open_input_file(self._path("predictions", part_name(part))) as f:
            table = pq.read_table(f, columns=HISTOGRAM_COLUMNS)
        return [(np.frombuffer(row["histogram_cells"], "<i4"), np.frombuffer(row["histogram_counts"], "<i4"))
                for row in table.to_pylist()]

    def iter_predictions(self, num_parts: int) -> Iterator[PredictionRecord]:
        """Prediction records in canonical order, one part in memory at a time."""
        for part in range(num_parts):
            yield from self.part_predictions(part)

    def part_predictions(self, part: int) -> list[PredictionRecord]:
        """The prediction records of one part, in canonical order."""
        with self._fs.open_input_file(self._path("predictions", part_name(part))) as f:
            table = pq.read_table(f)
        records = []
        for row in table.to_pylist():
            shape = (row["height"], row["width"])
            gt = row["ground_truth"]
            records.append(PredictionRecord(
                index=row["index"],
                name=row["name"],
                image=row["image"],
                prediction=np.frombuffer(row["prediction"], np.uint8).reshape(shape),
                confidence=np.frombuffer(row["confidence"], "<f2").reshape(shape),
                class_pixels=np.asarray(row["class_pixels"], np.int64),
                ground_truth=None if gt is None else np.frombuffer(gt, np.uint8).reshape(shape),
            ))
        return records

    def read_labels(self, columns: list[str] | None = None, rows: range | None = None) -> pa.Table:
        """The label rows of a complete store in canonical order: all of them, or only
        ``rows`` (positions in that order; a training worker's shard), reading only the
        row groups that hold them (and every part's footer, to count its rows)."""
        tables = list(self.iter_labels(columns, rows))
        if not tables:  # an empty shard: the schema, no rows
            return LABEL_SCHEMA.empty_table().select(columns or LABEL_SCHEMA.names)
        return pa.concat_tables(tables)

    def iter_labels(self, columns: list[str] | None = None, rows: range | None = None) -> Iterator[pa.Table]:
        """``read_labels`` one row group (16 rows) at a time, in the same order: a reader
        that keeps less than the rows themselves (compressed labels) never holds them all."""
        manifest, start = self.manifest(), 0
        rows = range(0, 2 ** 62) if rows is None else rows  # None: every row
        for part in range(manifest["num_parts"]):
            with self._fs.open_input_file(self._path("labels", part_name(part))) as f:
                parquet = pq.ParquetFile(f)
                for group in range(parquet.num_row_groups):
                    n = parquet.metadata.row_group(group).num_rows
                    lo, hi = max(rows.start, start), min(rows.stop, start + n)
                    if lo < hi:
                        yield parquet.read_row_group(group, columns=columns).slice(lo - start, hi - lo)
                    start += n


def decode_label(row: dict) -> np.ndarray:
    """The pseudo-label map of one ``labels`` row."""
    return np.frombuffer(row["label"], np.uint8).reshape(row["height"], row["width"])
