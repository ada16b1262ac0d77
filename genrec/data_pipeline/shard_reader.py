"""Read a rank's units (row groups) ahead of the step, in a small pool of threads.

    reader = RowGroupReader(columns)
    for step, loaded in read_ahead(steps, units_of, load, threads=2, depth=8):
        ...   # loaded[key] is load(key)'s result, for every key in units_of(step)

pyarrow decodes with the GIL released, so `threads` row groups decode in parallel while
the consumer assembles batches. Each thread keeps the footers of the last few files it
opened (a ParquetFile is not shared between threads), so a file's footer is parsed at most
once per thread while the stream reads it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from genrec.data_pipeline.shard_index import WindowIndex, check_file

OPEN_FILES_PER_THREAD = 4


class RowGroupReader:
    """`read(index, file_i, group)`: one row group of a window's file, given columns."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self._local = threading.local()

    def read(self, index: WindowIndex, file_i: int, group: int) -> pa.Table:
        files: OrderedDict = getattr(self._local, "files", None) or OrderedDict()
        self._local.files = files
        path = str(Path(index.directory) / index.files[file_i])
        pf = files.pop(path, None)
        if pf is None:
            pf = pq.ParquetFile(path)
            check_file(path, pf.metadata, index, file_i)
        files[path] = pf
        while len(files) > OPEN_FILES_PER_THREAD:
            files.popitem(last=False)[1].close()
        return pf.read_row_group(group, columns=self.columns)


def read_ahead(
    steps: Iterable,
    units_of: Callable[[object], list[Hashable]],
    load: Callable[[Hashable], object],
    threads: int,
    depth: int,
) -> Iterator[tuple[object, dict]]:
    """Yield (step, {key: load(key)}) in order, loading up to `depth` keys ahead in threads.

    A key needed by several consecutive steps is loaded once (the next step is always
    looked at before a key is dropped).
    """
    steps = iter(steps)
    pending: deque = deque()
    futures: dict[Hashable, Future] = {}
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="genrec-stream-read")
    try:
        done = False
        while True:
            while not done and (len(pending) < 2 or len(futures) < depth):
                step = next(steps, None)
                if step is None:
                    done = True
                    break
                pending.append(step)
                for k in units_of(step):
                    if k not in futures:
                        futures[k] = pool.submit(load, k)
            if not pending:
                return
            step = pending.popleft()
            yield step, {k: futures[k].result() for k in units_of(step)}
            needed = {k for s in pending for k in units_of(s)}
            for k in units_of(step):
                if k not in needed:
                    futures.pop(k, None)
    finally:
        for f in futures.values():
            f.cancel()
        pool.shutdown(wait=True)
