"""Evaluation shared by methods and callbacks: weighted kNN on frozen features, confusion-matrix pictures (and the
callback that saves them)."""
