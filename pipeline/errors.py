"""Errors that mean "the user's input is wrong": the CLI prints them on one line and exits 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input. The message names the input and says how to fix it."""
