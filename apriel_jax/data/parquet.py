"""Parquet files as a random-access record source, local or ``gs://`` (source kind ``parquet``).

Parquet is the layout of most public vision-language datasets: a chat or text column and the images
as encoded bytes. Rows become records by the mapping of :mod:`.columns` (which column holds what,
and where the images go).

Random access goes through the row-group index in each file's footer: reading a row reads its whole
row group (only the columns the mapping uses), and each process keeps the last ``cached_row_groups``
row groups, so rows read in file order, or close to it, cost one group read per group. A fully
shuffled read of a large file costs one group read per row: prefer files with small row groups
(a few hundred rows, as Hugging Face's own Parquet exports use) for such sources. On GCS every read
is a range request through a file handle each process opens on first use; nothing downloads a
whole file.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from apriel_jax import storage

from .columns import Columns, row_to_record
from .files import LazyFiles, open_for_random_reads, parent_dir
from .sources import DataError, _as_paths, locate

__all__ = ["ParquetSource"]


def _footer(path: str):
    """(row counts of the row groups, column names) of one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_for_random_reads(path) as fh:
        try:
            with storage.storage_errors(path, "read"):
                meta = pq.read_metadata(fh)
        except pa.ArrowInvalid as err:
            raise DataError(f"{path}: not a Parquet file: {err}") from err
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], list(meta.schema.to_arrow_schema().names)


class ParquetSource:
    """Rows of Parquet files (local or ``gs://``) as records; ``columns`` names the columns to read."""

    def __init__(self, paths, columns: Columns | None = None, cached_row_groups: int = 2):
        self.paths = _as_paths(paths)
        self.columns = columns or Columns()
        self.cached_row_groups = max(1, int(cached_row_groups))
        with ThreadPoolExecutor(max_workers=min(16, len(self.paths))) as pool:
            footers = list(pool.map(_footer, self.paths))
        self._read_columns: list[list[str]] = []
        group_file, group_index, group_rows, group_first_row = [], [], [], []
        for f, (rows, names) in enumerate(footers):
            if self.columns.text not in names and self.columns.messages not in names:
                raise DataError(f"{self.paths[f]}: has neither a {self.columns.text!r} nor a "
                                f"{self.columns.messages!r} column (it has {names}); name yours in the "
                                "source's options text_column / messages_column")
            image_column = self.columns.image_column(names)
            if image_column and self.columns.images and image_column not in names:
                raise DataError(f"{self.paths[f]}: no images column {image_column!r} (it has {names})")
            self._read_columns.append(self.columns.used(names))
            first = 0
            for g, n in enumerate(rows):
                group_file.append(f)
                group_index.append(g)
                group_rows.append(n)
                group_first_row.append(first)
                first += n
        self._group_file = np.asarray(group_file, np.int32)
        self._group_index = np.asarray(group_index, np.int32)
        self._group_first_row = np.asarray(group_first_row, np.int64)
        self._ends = np.cumsum(np.asarray(group_rows, np.int64))
        self._len = int(self._ends[-1]) if len(self._ends) else 0
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._files = LazyFiles(self.paths)
        self._parquet: dict[int, object] = {}
        self._cache: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        group, row = locate(self._ends, index)
        f = int(self._group_file[group])
        values = self._row_group(group).slice(row, 1).to_pylist()[0]
        where = f"{self.paths[f]}:row {int(self._group_first_row[group]) + row}"
        return row_to_record(values, where, self.columns, base_dir=parent_dir(self.paths[f]))

    def _row_group(self, group: int):
        """The columns the mapping uses of one row group, from this process's cache or read now."""
        import pyarrow.parquet as pq

        with self._lock:
            table = self._cache.get(group)
            if table is not None:
                self._cache.move_to_end(group)
                return table
            f = int(self._group_file[group])
            with storage.storage_errors(self.paths[f], "read"):
                if f not in self._parquet:
                    self._parquet[f] = pq.ParquetFile(self._files.handle(f))
                table = self._parquet[f].read_row_group(int(self._group_index[group]), columns=self._read_columns[f])
            self._cache[group] = table
            while len(self._cache) > self.cached_row_groups:
                self._cache.popitem(last=False)
            return table

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_files", "_parquet", "_cache", "_lock"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_state()

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} files, {self._len} rows)"

