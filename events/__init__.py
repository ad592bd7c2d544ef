"""batchd's event log: the envelope, the codec, the store contract and its backends.

This package imports nothing from `batchd.projections` or `batchd.scheduler`.
"""

from __future__ import annotations
