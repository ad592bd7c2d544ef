"""`job exec` output: bytes read in chunks become text without breaking characters."""

from __future__ import annotations

from batchd.scheduler.runtimes import OutputText


def test_a_character_split_between_reads_stays_whole_and_each_stream_keeps_its_own():
    sent: list[tuple[str, str]] = []
    text = OutputText(lambda **field: sent.extend(field.items()))
    data = ("a" + "é" * 10 + "✓").encode()
    for i in range(0, len(data), 3):  # every read ends inside a character now and then
        text("stdout", data[i : i + 3])
        text("stderr", b"\xc3")  # half of an "é" on the other stream: held, not mixed in
    text("stderr", b"\xa9")
    text("stdout", b"\xff")  # not UTF-8
    text.flush()
    out = "".join(t for name, t in sent if name == "stdout")
    err = "".join(t for name, t in sent if name == "stderr")
    assert out == "a" + "é" * 10 + "✓" + "\ufffd"
    assert err.endswith("é") and "\ufffd" in err  # the unfinished ones, replaced in order
