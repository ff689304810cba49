"""`launch/train.py` for one process of a multi-process test, recording the shard files its
input pipeline opens and reads.

    python tests/train_process.py SHARD_LOG.json  [launch/train.py flags ...]

Runs launch/train.py as __main__ with the remaining arguments; at exit writes
{"opened": [files given to ShardRecordSource], "read": [files a record was read from],
"torch_imported": whether anything imported torch (training never should)} to SHARD_LOG.json. Only observes dynamicid_jax.data.pipeline (wraps two methods); changes nothing.
"""

import atexit
import json
import pathlib
import runpy
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynamicid_jax.data import pipeline  # noqa: E402

log_path, args = sys.argv[1], sys.argv[2:]
opened: list[str] = []
read: set[str] = set()
lock = threading.Lock()
_init, _getitem = pipeline.ShardRecordSource.__init__, pipeline.ShardRecordSource.__getitem__


def _recording_init(self, folder, files):
    opened.extend(files)
    _init(self, folder, files)


def _recording_getitem(self, i):
    with lock:
        read.add(self.files[self._locations[i][0]])
    return _getitem(self, i)


pipeline.ShardRecordSource.__init__ = _recording_init
pipeline.ShardRecordSource.__getitem__ = _recording_getitem
atexit.register(lambda: pathlib.Path(log_path).write_text(json.dumps(
    {"opened": opened, "read": sorted(read), "torch_imported": "torch" in sys.modules})))

train = ROOT / "launch" / "train.py"
sys.argv = [str(train), *args]
runpy.run_path(str(train), run_name="__main__")
