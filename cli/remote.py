"""``craft generate --url`` and ``craft models``: the client side of the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .common import CliError, HelpFormatter, ProgressBar

__all__ = ["generate_remote", "run_models", "register"]


def _fields(request) -> dict:
    """A ``GenerateRequest``'s fields as ``CraftClient.generate`` keywords (prompts aside)."""
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name != "prompts"}
    fields["negative_prompt"] = fields["negative_prompt"] or None
    return fields


def generate_remote(args: argparse.Namespace, request):
    """Send a request to a server; returns its ``GenerateResult`` (images, notes, manifest id).
    Server errors exit 2 with the message."""
    from craft_client import CraftClient, CraftConnectionError, CraftServerError

    if args.stream and args.protocol != "grpc":
        raise CliError(f"--protocol: --stream needs grpc (got {args.protocol!r})")
    try:
        with CraftClient(args.url, args.protocol, model=args.model) as client:
            if args.stream:
                result, bar = None, ProgressBar()
                try:
                    for event in client.stream(list(request.prompts), **_fields(request)):
                        if event.result is not None:
                            result = event.result
                        else:
                            bar(event.step, event.total)
                finally:
                    bar.close()
            else:
                result = client.generate(list(request.prompts), **_fields(request))
    except CraftConnectionError as exc:
        raise CliError(str(exc)) from exc
    except CraftServerError as exc:
        raise CliError(f"server refused the request: {exc}") from exc
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result


def run_models(args: argparse.Namespace) -> int:
    from craft_client import CraftClient, CraftConnectionError, CraftServerError

    try:
        with CraftClient(args.url, args.protocol, model=args.model) as client:
            info = client.catalog()
    except CraftConnectionError as exc:
        raise CliError(str(exc)) from exc
    except CraftServerError as exc:
        raise CliError(f"server: {exc}") from exc
    manifest = info.get("manifest", {})
    if manifest.get("status") == "rejected":  # on stderr, and also with --json
        print(f"warning: the server refused the manifest.json now in its repository and serves the last good "
              f"one (below): {manifest.get('reason')}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"architecture: {info['arch']}   runtime: {info.get('runtime')} {info.get('precision')}")
    if info.get("manifest_id"):
        print(f"manifest: {info['manifest_id']}")
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


def register(sub) -> None:
    p = sub.add_parser("models", formatter_class=HelpFormatter, help="list the LoRAs and defaults a server offers")
    p.add_argument("--url", required=True, help="server HOST:PORT, or several comma-separated (replicas)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how to reach the server")
    p.add_argument("--model", default="craft_pipeline", help="Triton pipeline model name")
    p.add_argument("--json", action="store_true", help="print the catalogue as JSON")
    p.set_defaults(func=run_models)
