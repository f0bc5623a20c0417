#!/usr/bin/env bash
# The served demo on the trained toy world: demo assets -> craft export -> craft serve (background) ->
# craft generate over gRPC. Writes out/demo.png: a held-out shape (content LoRA "heart") in a held-out
# style (style LoRA "gradient"), which the base model never saw.
set -euo pipefail
VENV=${VENV:-.venv}
CRAFT="$VENV/bin/craft"
DEMO=${DEMO:-out/demo-assets}
RECIPE=${RECIPE:-$DEMO/recipe-toy.toml}
REPO=${REPO:-out/repo-toy}
PROMPT=${PROMPT:-"a sks object <c> in zzs style <s>"}
CONTENT=${CONTENT:-heart}
STYLE=${STYLE:-gradient}
PORT=${DEMO_PORT:-18100}   # HTTP; gRPC and metrics on the next two ports
HTTP=$PORT; GRPC=$((PORT + 1)); METRICS=$((PORT + 2))

[ -f "$RECIPE" ] || "$CRAFT" demo-assets --out "$DEMO"
"$CRAFT" export --recipe "$RECIPE" --out "$REPO"

"$CRAFT" serve --repo "$REPO" --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
    --log-file out/tritonserver.log &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 240); do
    if curl -fsS "http://127.0.0.1:$HTTP/v2/models/craft_pipeline/ready" >/dev/null 2>&1; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then echo "craft serve exited; see out/tritonserver.log" >&2; exit 1; fi
    sleep 1
done
"$CRAFT" models --url "127.0.0.1:$GRPC"
"$CRAFT" generate --url "127.0.0.1:$GRPC" --prompt "$PROMPT" \
    --content "$CONTENT" --style "$STYLE" --seed 7 --stream --out out/demo.png
