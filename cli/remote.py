"""``craft generate --url`` and ``craft models``: the client side of the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from craft_client.client import CraftClient, CraftServerError

__all__ = ["generate_remote", "run_models_cli"]


def _fields(request) -> dict:
    """A ``GenerateRequest``'s fields as ``CraftClient.generate`` keywords (prompts aside)."""
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name != "prompts"}
    fields["negative_prompt"] = fields["negative_prompt"] or None
    return fields


def _progress_bar(step: int, total: int) -> None:
    width = 30
    filled = int(width * step / max(total, 1))
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}", end="", file=sys.stderr, flush=True)


def generate_remote(args: argparse.Namespace, request) -> np.ndarray:
    """Send a request to a server; returns (N, H, W, 3) uint8. Server errors exit 2 with the message."""
    try:
        with CraftClient(args.url, args.protocol, model=args.model) as client:
            if args.stream:
                result = None
                for event in client.stream(list(request.prompts), **_fields(request)):
                    if event.result is not None:
                        result = event.result
                    else:
                        _progress_bar(event.step, event.total)
                print(file=sys.stderr)
            else:
                result = client.generate(list(request.prompts), **_fields(request))
    except CraftServerError as exc:
        raise ValueError(f"server refused the request: {exc}") from exc
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result.images


def run_models_cli(args: argparse.Namespace) -> int:
    try:
        with CraftClient(args.url, args.protocol, model=args.model) as client:
            info = client.catalog()
    except CraftServerError as exc:
        raise ValueError(f"server: {exc}") from exc
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"architecture: {info['arch']}   runtime: {info.get('runtime')} {info.get('precision')}")
    print("LoRAs:")
    for lora in info["loras"]:
        print(f"  {lora['name']:<20} {lora['kind']:<8} rank {lora.get('rank', '?'):<4} gammas {lora['gammas']}")
    print("pairs: " + (", ".join("+".join(p) for p in info["pairs"]) or "(none)"))
    d = info["defaults"]
    print(f"defaults: steps {d['steps']}, guidance {d['guidance']}, scheduler {d['scheduler']}, "
          f"{d['height']}x{d['width']}, mode {d['mode']}, windows content {d['content_window']} style {d['style_window']}")
    e = info["engine"]
    print(f"sizes: {e['min_size']}..{e['max_size']} px (multiples of {e.get('multiple', 8)}), up to {e['max_batch']} prompts")
    return 0
