"""fsdp4bit: 4-bit (NF4/FP4) quantized weights as first-class citizens of PyTorch FSDP2.

``import fsdp4bit as bnb`` is enough for code written against bitsandbytes' 4-bit API (its deliberate
differences are listed in NOTES.md, "bitsandbytes compatibility").
"""

from . import functional, nn
from .autograd import matmul_4bit
from .quant_state import QuantState

__version__ = "0.1.0"

__all__ = ["functional", "nn", "matmul_4bit", "QuantState", "__version__"]
