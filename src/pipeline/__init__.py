"""The one fit pipeline every run goes through (``fit.py``), with its checkpoint I/O, loggers and callbacks."""
