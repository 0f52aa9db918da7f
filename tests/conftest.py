"""Test-wide settings. The CRD schemas `arrcoc validate` reads default to .arrcoc/crds (filled by `make crds`,
which needs the network); where a pinned copy sits beside the checkout, the tests use it instead."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PINNED_CRDS = REPO.parent / "shared" / "crds"

if "ARRCOC_CRD_DIR" not in os.environ and _PINNED_CRDS.is_dir():
    os.environ["ARRCOC_CRD_DIR"] = str(_PINNED_CRDS)
