"""Library code has no global side effects at import: environment, torch threads, matplotlib's
backend, the global RNGs all stay as the caller left them (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, os, pkgutil, importlib, random
# third-party imports first: their own effects (torch sets KMP_*, some draw random numbers at
# import) are theirs, not ours
import numpy as np, torch, matplotlib, timm, torchvision, zarr, sklearn, prefect, dask
import torch._dynamo, safetensors, PIL, fsspec, rich
torch.set_num_threads(3)
random.seed(1); np.random.seed(1); torch.manual_seed(1)
env, backend = dict(os.environ), matplotlib.get_backend()
states = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist())
import pipeline, stores, flows
names = []
for pkg in (pipeline, stores, flows):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
        names.append(m.name)
print(json.dumps({
    "modules": len(names),
    "env": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "threads": torch.get_num_threads(),
    "backend_same": matplotlib.get_backend() == backend,
    "rng_same": states == (random.getstate(), np.random.get_state()[1].tolist(),
                           torch.get_rng_state().tolist()),
}))
"""


def test_importing_every_module_changes_nothing_global():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["modules"] > 30
    assert report["env"] == []
    assert report["threads"] == 3
    assert report["backend_same"] and report["rng_same"]
