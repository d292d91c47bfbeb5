"""Front door: `python -m src.benchmark [--sections a,b] [--batch-size 8,16] [--list]`: speed and memory tables."""

from __future__ import annotations

from src.benchmarks.core import main

if __name__ == "__main__":
    main()
