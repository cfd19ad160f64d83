"""Subcommands of the ``ztfpsf`` command line (see :mod:`ztfpsf.cli`)."""
