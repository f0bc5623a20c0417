"""Client library for the CRAFT-LoRA Triton pipeline (gRPC / HTTP, sync and asyncio)."""

from .client import (AsyncCraftClient, CraftClient, CraftServerError, CraftUnavailableError, GenerateResult, Progress,
                     build_request)
from .endpoints import RetryPolicy

__all__ = ["CraftClient", "AsyncCraftClient", "CraftServerError", "CraftUnavailableError", "RetryPolicy", "GenerateResult",
           "Progress", "build_request"]
