"""Train the shapes model from nothing: ``python -m engine.models.shapes.train --out DIR``.

Three resumable stages, each skipped when its output exists in DIR:

1. ``vae/``: the AutoencoderKL, trained as an autoencoder on rendered scenes.
2. ``latents.pt``: the training scenes encoded once (latent means, scaled to unit variance).
3. ``dit.pt``: the T5 encoder and the PixArt transformer trained together on the latents
   (v-prediction, caption dropout for classifier-free guidance, an EMA of both). Every
   ``--eval-every`` steps the EMA model draws held-out prompts through the stock
   ``PixArtSigmaPipeline``; the best so far is saved, fp16, as a diffusers folder in ``best/``.

It ends by scoring ``best/`` on the full held-out set. Seeded; a killed run resumes where its
last checkpoint left off when started again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from tqdm import tqdm

from engine.models.shapes import components
from engine.models.shapes.dataset import (
    Scene,
    caption,
    held_out_scenes,
    random_scene,
    render,
    to_tensor_array,
)
from engine.models.shapes.evaluate import Scores, score

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
CAPTION_DROPOUT = 0.1


def log(message: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout)
    sys.stdout.flush()


def _image_batch(rng: random.Random, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([to_tensor_array(render(random_scene(rng), rng)) for _ in range(n)]))


def _progress(total: int, initial: int, name: str) -> tqdm:
    return tqdm(total=total, initial=initial, desc=name, file=sys.stdout, mininterval=15,
                ascii=True, ncols=100, bar_format="{desc} {n}/{total} {percentage:3.0f}%|{bar:20}| "
                "{elapsed}<{remaining} {postfix}")


def psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1 / max(mse, 1e-10))


def train_vae(out: Path, steps: int, batch: int, seed: int) -> AutoencoderKL:
    final = out / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final).eval()
    torch.manual_seed(seed)
    vae = components.build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt_path, start = out / "vae.pt", 0
    rng = random.Random(seed)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start, rng = ckpt["step"], ckpt["rng"]
    check = _image_batch(random.Random(seed + 1), 16)
    bar, last_save = _progress(steps, start, "vae"), time.monotonic()
    for step in range(start, steps):
        images = _image_batch(rng, batch)
        dist = vae.encode(images).latent_dist
        # The posterior's mean, not a sample: at initialisation its unit variance drowns the
        # signal, and the transformer trains on (and the pipeline decodes) means anyway.
        recon = vae.decode(dist.mode()).sample
        loss = F.mse_loss(recon, images) + 0.1 * F.l1_loss(recon, images) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)
        if time.monotonic() - last_save > 240 or step + 1 == steps:
            vae.eval()
            log(f"vae step {step + 1}: held-out PSNR {psnr(vae, check):.2f} dB")
            vae.train()
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "rng": rng},
                       ckpt_path)
            last_save = time.monotonic()
    bar.close()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(check[i:i + 32]).latent_dist.mode() for i in range(0, 16, 8)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(final)
    log(f"vae done: PSNR {psnr(vae, check):.2f} dB, scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def encode_dataset(out: Path, vae: AutoencoderKL, count: int, seed: int) -> tuple[list[Scene], torch.Tensor]:
    path = out / "latents.pt"
    if path.exists():
        data = torch.load(path, weights_only=False)
        return data["scenes"], data["latents"]
    rng = random.Random(seed + 2)
    scenes, chunks = [], []
    for start in tqdm(range(0, count, 64), desc="encode", file=sys.stdout, mininterval=15, ascii=True):
        batch = [random_scene(rng) for _ in range(min(64, count - start))]
        images = torch.from_numpy(np.stack([to_tensor_array(render(s, rng)) for s in batch]))
        with torch.no_grad():
            chunks.append(vae.encode(images).latent_dist.mode() * vae.config.scaling_factor)
        scenes.extend(batch)
    latents = torch.cat(chunks)
    torch.save({"scenes": scenes, "latents": latents}, path)
    return scenes, latents


def generate(pipe, scenes: list[Scene], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch: int = 16) -> tuple[list[Scene], list]:
    """Draw every scene once per seed through the stock pipeline call."""
    jobs = [(s, seed) for seed in seeds for s in scenes]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        images += pipe([caption(s) for s, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, height=64, width=64, use_resolution_binning=False,
                       clean_caption=False).images
    return [s for s, _ in jobs], images


def evaluate_folder(folder: Path, count: int = 48, seeds: tuple[int, ...] = (0, 1)) -> Scores:
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return score(*generate(pipe, held_out_scenes(count), list(seeds)))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def export(folder: Path, tokenizer, text_encoder, vae, transformer) -> None:
    pipe = components.assemble(tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(vae),
                               copy.deepcopy(transformer))
    pipe.to(dtype=torch.float16).save_pretrained(folder)


def train_dit(out: Path, vae: AutoencoderKL, scenes: list[Scene], latents: torch.Tensor,
              args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    tokenizer = components.build_tokenizer()
    text_encoder = components.build_text_encoder(len(tokenizer)).train()
    transformer = components.build_transformer(args.layers, args.heads, args.head_dim, args.patch).train()
    ema_text, ema_transformer = copy.deepcopy(text_encoder).eval(), copy.deepcopy(transformer).eval()
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    alphas = components.build_scheduler().alphas_cumprod
    ckpt_path, step, rng, best = out / "dit.pt", 0, random.Random(args.seed + 3), -1.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        for module, key in ((text_encoder, "text"), (transformer, "transformer"),
                            (ema_text, "ema_text"), (ema_transformer, "ema_transformer")):
            module.load_state_dict(ckpt[key])
        opt.load_state_dict(ckpt["opt"])
        step, rng, best = ckpt["step"], ckpt["rng"], ckpt["best"]
        torch.set_rng_state(ckpt["torch_rng"])
    log(f"transformer {components.count_parameters(transformer) / 1e6:.2f}M, "
        f"text encoder {components.count_parameters(text_encoder) / 1e6:.2f}M parameters; "
        f"{len(scenes)} training scenes")
    probe = held_out_scenes(args.probe)
    bar, last_save = _progress(args.steps, step, "dit"), time.monotonic()
    running = None
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 300)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = [rng.randrange(len(scenes)) for _ in range(args.batch)]
        texts = ["" if rng.random() < CAPTION_DROPOUT else caption(scenes[i], rng.randrange(4)) for i in idx]
        tokens = tokenizer(texts, padding="max_length", max_length=components.MAX_CAPTION_TOKENS,
                           truncation=True, return_tensors="pt")
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas), (args.batch,))
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        pred = transformer(a * x0 + s * noise, encoder_hidden_states=text,
                           encoder_attention_mask=tokens.attention_mask, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                           return_dict=False)[0]
        loss = F.mse_loss(pred, a * noise - s * x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema_text, text_encoder, decay)
        _ema_update(ema_transformer, transformer, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix_str(f"loss {running:.4f} lr {lr:.1e}", refresh=False)
        if step % args.eval_every == 0 or step == args.steps:
            pipe = components.assemble(tokenizer, ema_text, vae, ema_transformer)
            scores = score(*generate(pipe, probe, [0]))
            total = scores.color_accuracy + scores.background_accuracy + scores.shape_accuracy
            log(f"step {step}: held-out {scores}")
            if total >= best:
                best = total
                export(out / "best", tokenizer, ema_text, vae, ema_transformer)
                (out / "best" / "training.json").write_text(json.dumps(
                    {"step": step, "probe": scores.as_dict(), "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
                log(f"saved best/ at step {step}")
        if time.monotonic() - last_save > 180 or step == args.steps:
            torch.save({"text": text_encoder.state_dict(), "transformer": transformer.state_dict(),
                        "ema_text": ema_text.state_dict(), "ema_transformer": ema_transformer.state_dict(),
                        "opt": opt.state_dict(), "step": step, "rng": rng, "best": best,
                        "torch_rng": torch.get_rng_state()}, ckpt_path)
            last_save = time.monotonic()
    bar.close()
    export(out / "last", tokenizer, ema_text, vae, ema_transformer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.shapes.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="working folder (checkpoints, best/, last/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=8000, help="training scenes encoded for the transformer")
    parser.add_argument("--steps", type=int, default=40000, help="transformer training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4, help="transformer patch size on the 16x16 latents")
    parser.add_argument("--probe", type=int, default=16, help="held-out prompts drawn at each evaluation")
    parser.add_argument("--final-eval", type=int, default=48, help="held-out prompts scored at the end (x2 seeds)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        vae = train_vae(args.out, args.vae_steps, args.vae_batch, args.seed)
        scenes, latents = encode_dataset(args.out, vae, args.scenes, args.seed)
        train_dit(args.out, vae, scenes, latents, args)
        if args.final_eval:
            scores = evaluate_folder(args.out / "best", args.final_eval)
            log(f"best/ on {args.final_eval} held-out prompts x 2 seeds: {scores}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
