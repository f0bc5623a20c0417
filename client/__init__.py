"""Client library for the CRAFT-LoRA Triton pipeline (gRPC / HTTP, sync and asyncio)."""

from .client import (AsyncCraftClient, CraftClient, CraftConnectionError, CraftServerError, GenerateResult, Progress,
                     StreamStalled, build_request)
from .endpoints import RetryPolicy
from .stall import StallPolicy

__all__ = ["CraftClient", "AsyncCraftClient", "CraftServerError", "CraftConnectionError", "StreamStalled", "RetryPolicy",
           "StallPolicy", "GenerateResult", "Progress", "build_request"]
