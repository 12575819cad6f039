#!/usr/bin/env bash
# Talk to a gfdit server with curl: health, models, one image, then a stream of events.
#
#   gfdit serve tiny-pixart --port 8000
#   bash examples/online/curl.sh [URL] [MODEL]
#
# URL and MODEL default to $GFDIT_URL (http://127.0.0.1:8000) and $GFDIT_MODEL (the
# server's default); $GFDIT_API_KEY is sent as the bearer key; images go to $OUT_DIR (out).
set -euo pipefail
URL="${1:-${GFDIT_URL:-http://127.0.0.1:8000}}"
MODEL="${2:-${GFDIT_MODEL:-}}"
OUT_DIR="${OUT_DIR:-out}"
AUTH="Authorization: Bearer ${GFDIT_API_KEY:-unused}"  # ignored by a server without --api-key
MODEL_JSON=null
if [[ -n "$MODEL" ]]; then MODEL_JSON="\"$MODEL\""; fi
mkdir -p "$OUT_DIR"

curl -sS --fail "$URL/health"; echo
curl -sS --fail -H "$AUTH" "$URL/v1/models"; echo

# One image; the answer holds it as base64 in data[0].b64_json (jq -r works too).
curl -sS --fail-with-body "$URL/v1/images/generations" -H "$AUTH" -H "Content-Type: application/json" \
  -d "{\"model\": $MODEL_JSON, \"prompt\": \"a red fox in the snow\", \"size\": \"256x256\", \"quality\": \"low\", \"seed\": 1}" \
  | python3 -c 'import base64, json, sys; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))' \
  > "$OUT_DIR/curl_fox.png"
echo "wrote $OUT_DIR/curl_fox.png"

# A stream (Server-Sent Events): one partial image, then the completed one. -N prints
# events as they arrive; here only their names are shown.
curl -sS -N --fail-with-body "$URL/v1/images/generations" -H "$AUTH" -H "Content-Type: application/json" \
  -d "{\"model\": $MODEL_JSON, \"prompt\": \"a red fox\", \"size\": \"256x256\", \"quality\": \"low\", \"stream\": true, \"partial_images\": 1}" \
  | grep '^event:'
