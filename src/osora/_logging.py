"""Quiet one third-party import-time warning; imported first by ``osora/__init__.py``, before peft.

bitsandbytes' CPU backend logs a warning at import when the optional Hub package ``kernels`` is missing, then uses
its own 4-bit kernel. peft imports bitsandbytes whenever it is installed, so every osora command would print it.
"""

import logging

_MESSAGE = "Failed to load CPU gemm_4bit_forward"

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith(_MESSAGE)
)
