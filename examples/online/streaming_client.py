"""Stream one image from a gfdit server: previews while it denoises, then the final image.

    gfdit serve tiny-pixart --port 8000
    python examples/online/streaming_client.py --url http://127.0.0.1:8000 --partial-images 2

--url, --model and --api-key default to $GFDIT_URL, $GFDIT_MODEL and $GFDIT_API_KEY.
"""

import argparse
import base64
import os
import time
from pathlib import Path

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--url", default=os.environ.get("GFDIT_URL", "http://127.0.0.1:8000"))
parser.add_argument("--model", default=os.environ.get("GFDIT_MODEL"), help="default: the server's")
parser.add_argument("--api-key", default=os.environ.get("GFDIT_API_KEY", "unused"))
parser.add_argument("--prompt", default="a castle over the sea at night")
parser.add_argument("--size", default="256x256")
parser.add_argument("--partial-images", type=int, default=2, help="previews before the final image (0-3)")
parser.add_argument("--out-dir", default="out")
args = parser.parse_args()

out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)

start = time.perf_counter()
stream = client.images.generate(model=args.model, prompt=args.prompt, size=args.size, stream=True,
                                partial_images=args.partial_images, extra_body={"seed": 7})
for event in stream:
    if event.type == "image_generation.partial_image":
        path = out_dir / f"partial_{event.partial_image_index}.png"
    else:  # image_generation.completed
        path = out_dir / "final.png"
    path.write_bytes(base64.b64decode(event.b64_json))
    print(f"{time.perf_counter() - start:6.2f}s  {event.type}  -> {path}")
