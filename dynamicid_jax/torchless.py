"""Importing third-party packages that pull in torch only because it is installed.

Running and training never import torch (it is a reference and format reader only, in the
test and `convert` extras). Two packages we use import it at their own import time when it is
present: `tfrecord` (its optional PyTorch dataset) and `tensorboardX` (for an isinstance
check). On a machine with torch installed that costs seconds and about a gigabyte per process.
`import_hiding_torch(name)` imports such a package while `import torch` fails, the case both
packages handle; torch stays importable afterwards.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_hiding_torch(name: str) -> ModuleType:
    """`importlib.import_module(name)`, with `import torch` failing during the import unless
    torch is already loaded (then nothing is hidden)."""
    if name in sys.modules or "torch" in sys.modules:
        return importlib.import_module(name)
    sys.modules["torch"] = None  # a None entry makes `import torch` raise ImportError
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
