"""Prefect flows and the ``carrot`` command line. Thin: the work lives in ``pipeline``/``stores``.

Importing this package changes nothing global: the command line applies its Prefect defaults
(`flows.runtime.apply_defaults`) in `flows.cli.main`, before Prefect is imported.
"""
