"""Client library for the CRAFT-LoRA Triton pipeline (gRPC / HTTP, sync and asyncio)."""

from .client import (AsyncCraftClient, CraftClient, CraftConnectionError, CraftServerError, GenerateResult, Progress,
                     build_request)
from .endpoints import RetryPolicy

__all__ = ["CraftClient", "AsyncCraftClient", "CraftServerError", "CraftConnectionError", "RetryPolicy",
           "GenerateResult", "Progress", "build_request"]
