"""Serving: the model registry, the continuous-batching engine, sampling and text assembly."""
