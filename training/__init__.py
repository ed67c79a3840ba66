"""Training package: data, model, losses, engine and evaluation for the DR multi-task network.

Knows nothing of ``screening``; the worker imports from here, never the reverse.
"""
