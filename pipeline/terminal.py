"""Text that is safe to print on a terminal line: names from the file system are not trusted."""

from __future__ import annotations

__all__ = ["one_line", "printable"]


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character escaped as ``repr`` does.

    Control characters (ESC of terminal escape sequences, newlines, tabs, DEL, C1), Unicode
    format characters (bidi overrides), separators and lone surrogates (undecodable file-name
    bytes) become ``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``…; everything else, spaces and
    backslashes included, is kept as is. The result is one line and always encodable.
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def one_line(text: object, limit: int = 300) -> str:
    """:func:`printable` of ``text``, cut to ``limit`` characters (for quoting foreign errors)."""
    s = printable(text).strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"
