"""printable: names from the file system are escaped before they reach a terminal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.terminal import one_line, printable


def test_escape_sequences_and_line_breaks_are_escaped():
    assert printable("a\x1b[31mred\x1b[0m.jpg") == "a\\x1b[31mred\\x1b[0m.jpg"
    assert printable("two\nlines\r\tx\x07") == "two\\nlines\\r\\tx\\x07"
    assert printable("\u202eevil\u2028") == "\\u202eevil\\u2028"  # bidi override, separator
    assert printable("bad\udcffbyte") == "bad\\udcffbyte"  # undecodable file-name byte
    assert printable("café 猫 a b\\c.png") == "café 猫 a b\\c.png"  # printable text unchanged
    assert printable(3) == "3"


def test_one_line_cuts_long_foreign_messages():
    assert one_line("x" * 500, limit=10) == "x" * 9 + "…"
    assert one_line(" a\nb ") == "a\\nb"


@given(st.text())
def test_property_printable_is_one_safe_line(text):
    out = printable(text)
    assert out.isprintable()  # no control, format, separator or surrogate characters left
    out.encode("utf-8")  # always encodable (lone surrogates escaped)
    if text.isprintable():
        assert out == text
