"""Client library for the CRAFT-LoRA Triton pipeline (gRPC / HTTP, sync and asyncio)."""

from .client import AsyncCraftClient, CraftClient, CraftServerError, GenerateResult, Progress, build_request

__all__ = ["CraftClient", "AsyncCraftClient", "CraftServerError", "GenerateResult", "Progress", "build_request"]
