"""Speed and memory benchmarks (``python -m src.benchmark``). Nothing in the library imports this package."""
