"""ExSSNeT's materialiser: W * M_t, exactly SupSup's, over the backbone version the task was published with.

ExSSNeT trains the backbone, but task t only ever sees the weights under its own mask M_t, and later
tasks change only weights outside every earlier mask; so (the task's backbone version) * M_t is fixed
once the task is published, and equals (any later version) * M_t bit for bit.
"""

from __future__ import annotations

from .materialize import _supsup, register_materializer

register_materializer("exssnet", parts=("masks",), into_buffers=True, on_any_device=True)(_supsup)
