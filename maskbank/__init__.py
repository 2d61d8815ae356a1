"""The `maskbank` command: the composition root that wires trainer, registry and serving together.

trainer and serving never import each other; only this package (and tests) import both.
"""
