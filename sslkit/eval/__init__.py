"""Evaluation of frozen encoders: features (extract + cache), k-NN, linear probe, FAISS retrieval, reports.

Library first, CLI second: :mod:`sslkit.eval.report` holds ``run_knn``, ``run_linear``, ``run_retrieval`` and
``run_copy_detection`` (a run directory in, a results dict and ``results.json`` out), and
:mod:`sslkit.eval.cli` is a thin argparse layer over them. Submodules are imported on demand, so the
training engine's ``from sslkit.eval.knn import knn_classify`` does not pull in matplotlib or scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "extract_features": "sslkit.eval.features",
    "cached_features": "sslkit.eval.features",
    "encoder_hash": "sslkit.eval.features",
    "knn_classify": "sslkit.eval.knn",
    "linear_probe": "sslkit.eval.linear",
    "retrieval_metrics": "sslkit.eval.retrieval",
    "run_knn": "sslkit.eval.report",
    "run_linear": "sslkit.eval.report",
    "run_retrieval": "sslkit.eval.report",
    "run_copy_detection": "sslkit.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sslkit.eval' has no attribute {name!r}")
