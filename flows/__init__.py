"""Prefect flows and the ``carrot`` command line. Thin: the work lives in ``pipeline``/``stores``."""

from flows.runtime import apply_defaults

apply_defaults()
