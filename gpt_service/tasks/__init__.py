"""Durable training tasks: the store, the worker that runs them, the child-process runner."""
