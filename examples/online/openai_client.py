"""Generate images through a gfdit server with the official openai SDK.

    gfdit serve tiny-pixart --port 8000
    python examples/online/openai_client.py --url http://127.0.0.1:8000 --out-dir out/

--url, --model and --api-key default to $GFDIT_URL, $GFDIT_MODEL and $GFDIT_API_KEY.
"""

import argparse
import base64
import os
import urllib.request
from pathlib import Path

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--url", default=os.environ.get("GFDIT_URL", "http://127.0.0.1:8000"))
parser.add_argument("--model", default=os.environ.get("GFDIT_MODEL"), help="default: the server's first")
parser.add_argument("--api-key", default=os.environ.get("GFDIT_API_KEY", "unused"))
parser.add_argument("--prompt", default="a red fox in the snow")
parser.add_argument("--size", default="256x256")
parser.add_argument("--quality", default="medium", help="low / medium / high: a share of the model's steps")
parser.add_argument("--out-dir", default="out")
args = parser.parse_args()

out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
model = args.model or client.models.list().data[0].id

# Two images as base64 PNGs. gfdit's extensions (seed, negative_prompt,
# num_inference_steps, guidance_scale) travel in extra_body.
result = client.images.generate(model=model, prompt=args.prompt, size=args.size, quality=args.quality, n=2,
                                extra_body={"seed": 1, "negative_prompt": "blurry"})
for k, image in enumerate(result.data):
    path = out_dir / f"openai_{k}.png"
    path.write_bytes(base64.b64decode(image.b64_json))
    print(f"wrote {path} ({result.size}, {model})")
print(f"usage: {result.usage.output_tokens} image tokens")

# Or a link to the image, kept by the server for a while and fetched without the key.
linked = client.images.generate(model=model, prompt=args.prompt, size=args.size, quality=args.quality,
                                response_format="url", output_format="jpeg")
with urllib.request.urlopen(linked.data[0].url) as reply:
    (out_dir / "openai_link.jpeg").write_bytes(reply.read())
print(f"wrote {out_dir / 'openai_link.jpeg'} from {linked.data[0].url}")
