"""The log's backends (memory, SQLite, PostgreSQL), and what every one of them stores."""

from __future__ import annotations

# The tables of a log and the columns each has, in every schema version so far: a log that
# lacks one is damaged (checked as it is opened, before anything is written).
LOG_COLUMNS: dict[str, frozenset[str]] = {
    "events": frozenset({
        "position", "event_id", "stream", "version", "type", "schema", "recorded_at", "actor",
        "correlation_id", "causation_id", "data", "hash",
    }),
    "log_head": frozenset({"id", "position", "hash", "recorded_at", "epoch"}),
    "snapshots": frozenset({"projection", "position", "format", "code_hash", "state"}),
    "batchd_schema": frozenset({"version"}),
}  # fmt: skip


def lacking(where: str, columns: dict[str, set[str]]) -> str | None:
    """What a log's tables (`columns`: each table's columns) lack, said as a damage of the
    log at `where`; None if nothing."""
    for table, wanted in LOG_COLUMNS.items():
        if table not in columns:
            return f"{where} is damaged: its {table} table is missing"
        missing = sorted(wanted - columns[table])
        if missing:
            return f"{where} is damaged: its {table} table lacks its {missing[0]} column"
    return None
