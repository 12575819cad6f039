"""Quality of the built-in default model (``shapes``) on held-out prompts, read by pixel statistics.

    python benchmarks/benchmark_default_model.py --json default_model.json --grid default_model.png

Every prompt names a (colour, shape, background) combination that never appeared in
training (48 prompts: each of the 24 held-out combinations plain, and again with a size or
position). Each is drawn through the engine (``DiT``, the model's default steps and
guidance) once per seed (--seeds, default 0 1), and read back with
``engine.models.shapes.evaluate``: the background is the border's median colour, the
object every pixel far from it, its colour their median, its shape the fill of its
bounding box. The grid has one row per prompt and one column per seed.

JSON keys (--json PATH): model, prompts, seeds, steps, color_accuracy, background_accuracy,
shape_accuracy, count, per_shape (shape -> its accuracy), per_color (colour -> colour
accuracy), grid (the PNG path).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402
from engine.models.shapes.dataset import caption, held_out_scenes  # noqa: E402
from engine.models.shapes.evaluate import read_image, score  # noqa: E402


def grid(rows: list[list[Image.Image]], labels: list[str], path: Path) -> None:
    tile, label_w = rows[0][0].width, 330
    sheet = Image.new("RGB", (label_w + tile * len(rows[0]), tile * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * tile + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image, (label_w + c * tile, r * tile))
    sheet.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid", default="default_model.png")
    args = parser.parse_args()

    from engine.request import ImageParams
    from entrypoints.offline import DiT

    scenes = held_out_scenes(args.prompts)
    prompts = [caption(s) for s in scenes]
    with DiT(model=args.model) as dit:
        steps = dit.model_info.default_steps
        jobs = [(i, seed) for i in range(len(scenes)) for seed in args.seeds]
        outputs = dit.generate([prompts[i] for i, _ in jobs], [ImageParams(seed=seed) for _, seed in jobs])
    images = {job: out.images[0] for job, out in zip(jobs, outputs)}
    ordered = [images[job] for job in jobs]
    scored = [scenes[i] for i, _ in jobs]
    total = score(scored, ordered)
    per_shape: dict[str, list[bool]] = defaultdict(list)
    per_color: dict[str, list[bool]] = defaultdict(list)
    for scene, image in zip(scored, ordered):
        reading = read_image(image)
        per_shape[scene.shape].append(reading.shape == scene.shape)
        per_color[scene.color].append(reading.color == scene.color)
    grid([[images[(i, seed)] for seed in args.seeds] for i in range(len(scenes))], prompts, Path(args.grid))
    figures = {
        "model": args.model, "prompts": len(scenes), "seeds": args.seeds, "steps": steps,
        **total.as_dict(),
        "per_shape": {k: sum(v) / len(v) for k, v in sorted(per_shape.items())},
        "per_color": {k: sum(v) / len(v) for k, v in sorted(per_color.items())},
        "grid": args.grid,
    }
    write_json(args.json, figures)
    rows = [("metric", "accuracy", "target")]
    rows += [("colour", f"{total.color_accuracy:.3f}", ">= 0.90"),
             ("background", f"{total.background_accuracy:.3f}", ">= 0.95"),
             ("shape", f"{total.shape_accuracy:.3f}", ">= 0.80")]
    rows += [(f"  shape: {k}", f"{v:.3f}", "") for k, v in figures["per_shape"].items()]
    print_table(f"{args.model}: {len(scenes)} held-out prompts x {len(args.seeds)} seeds, {steps} steps "
                f"(grid: {args.grid})", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
