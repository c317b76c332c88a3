"""The ``trainctl`` command line: thin commands over the Python API (see ``app.py``)."""
