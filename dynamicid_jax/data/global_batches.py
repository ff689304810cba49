"""Host-local numpy batches -> global `jax.Array`s on the mesh, read ahead in threads.

    it = GlobalBatchIterator(dataset, mesh)   # dataset[j] = batch j (data/pipeline.py)
    batch = next(it)                          # {name: jax.Array sharded on the batch axes}
    state = it.get_state(); ...; it.set_state(state)   # exact resume: the next batch index

Each host's local batch (global_batch_size / process_count rows) becomes one global array per
feature (`jax.make_array_from_process_local_data`; one `jax.device_put` of the whole batch in a
single process), sharded over the mesh's batch axes ('data', 'fsdp') by
`dynamicid_jax.sharding.batch_sharding`.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Mapping

import numpy as np


def to_global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local numpy batch -> {name: global jax.Array}, axis 0 = all hosts' rows.

    String features stay host-local numpy arrays (they cannot be device arrays). One process:
    a single `jax.device_put` of all arrays (the global batch is the local one); several:
    `jax.make_array_from_process_local_data` per array.
    """
    import jax

    local = {name: np.asarray(value) for name, value in local.items()}
    arrays = {name: value for name, value in local.items() if value.dtype.kind not in "USO"}
    if jax.process_count() == 1:
        placed = jax.device_put(arrays, sharding)
    else:
        placed = {name: jax.make_array_from_process_local_data(
            sharding, value, (value.shape[0] * jax.process_count(), *value.shape[1:]))
            for name, value in arrays.items()}
    return {name: placed.get(name, value) for name, value in local.items()}


class GlobalBatchIterator:
    """Iterates a batched MapDataset (element j = batch j) as global jax.Array batches.

    `num_threads` threads read the next `prefetch` batches ahead (at least one) and, given a
    mesh or sharding, place them on the devices too and wait until they are there: `next()`
    returns arrays ready for the step, and the time it blocks is only time the input was not
    ready. Without a mesh, `next_local()` gives the host-local numpy batches.

    `get_state()` is {"next_index": index of the next batch `next()` will return}: batches
    read ahead but not yet returned are not part of it, so a checkpoint taken after consuming
    k batches resumes at batch k exactly, and `set_state()` drops what was read ahead. The
    format is grain's iterator state, so states saved by the grain iterator used before keep
    working. Call `close()` (or use `with`) to stop the threads.

    Placed batches read ahead occupy device memory: `prefetch` batches besides the one in use.
    (grain's own iterator, used before, read ahead too but left the placement to `next()` on
    the caller's thread, which made `next()` block the loop far longer than here: figures in
    benchmarks/input_share_report.md.)
    """

    def __init__(self, dataset, mesh=None, *, num_threads: int = 2, prefetch: int = 2, sharding=None):
        if sharding is None and mesh is not None:
            from dynamicid_jax.sharding import batch_sharding

            sharding = batch_sharding(mesh)
        self.sharding = sharding  # None: host-local batches only (`next_local`)
        self._dataset = dataset
        self._length = len(dataset)
        self._depth = max(1, int(prefetch))
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads)), thread_name_prefix="input")
        self._pending: collections.deque = collections.deque()  # futures of batches next_index, next_index + 1, ...
        self._next_index = 0  # the next batch handed to the caller
        self._closed = False

    def _read(self, index: int):
        batch = self._dataset[index]
        if self.sharding is None:
            return batch
        import jax

        return jax.block_until_ready(to_global_batch(batch, self.sharding))

    def _fill(self) -> None:
        ahead = self._next_index + len(self._pending)
        while len(self._pending) < self._depth and ahead < self._length:
            self._pending.append(self._pool.submit(self._read, ahead))
            ahead += 1

    def _take(self):
        if self._closed:
            raise ValueError("GlobalBatchIterator is closed")
        self._fill()
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self._drop_pending()  # the state stays at the batch that failed
            raise
        self._next_index += 1
        self._fill()
        return batch

    def _drop_pending(self) -> None:
        for future in self._pending:
            future.cancel()
        concurrent.futures.wait(self._pending)
        self._pending.clear()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.sharding is None:
            raise ValueError("GlobalBatchIterator without a mesh gives host-local batches only: use next_local()")
        return self._take()

    def next_local(self) -> dict[str, np.ndarray]:
        """The next host-local numpy batch (an iterator made without a mesh or sharding)."""
        if self.sharding is not None:
            raise ValueError("this GlobalBatchIterator places its batches on the mesh: use next(), or make one "
                             "without a mesh for host-local batches")
        return self._take()

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        index = int(state["next_index"])
        if not 0 <= index <= self._length:
            raise ValueError(f"iterator state {dict(state)} is outside the dataset's {self._length} batches")
        self._drop_pending()
        self._next_index = index

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_pending()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
