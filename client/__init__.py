"""Client library for the CRAFT-LoRA Triton pipeline (gRPC / HTTP, sync and asyncio)."""

from .client import (AsyncCraftClient, CraftClient, CraftConnectionError, CraftServerError, GenerateResult, Progress,
                     build_request)

__all__ = ["CraftClient", "AsyncCraftClient", "CraftServerError", "CraftConnectionError", "GenerateResult", "Progress",
           "build_request"]
