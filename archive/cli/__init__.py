"""The ``archive`` command."""
