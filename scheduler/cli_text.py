"""Text the CLI prints for people: what came from a job or a user (a command line, an
error a job's output ends, a name in a message) is shown, never obeyed by the terminal."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` on one line, each control character in it (an escape sequence's ESC, a
    carriage return, a newline, a tab) written as its Python escape: `\\x1b`, `\\r`, `\\n`."""
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


def error_text(lines: list[str]) -> str:
    """An error the server answered (its message, then a line per field and problem) as the
    CLI prints it: `batchd: error: ` first, each line printable."""
    shown = [printable(line) for line in lines]
    return "\n".join([f"batchd: error: {shown[0]}", *shown[1:]])
