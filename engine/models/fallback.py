"""The whole-pipeline fallback: any diffusers pipeline without a native adapter, served as is.

A pipeline whose family no line of engine/models/registry.py names still runs: each
request calls ``pipeline(...)`` itself, one request per call, with no step batching and no
sequence parallelism (SGLang-Diffusion's ``--backend diffusers`` does the same). What the
engine still gives it: progress after every step, abort between steps, the scheduler's
queueing and data parallelism over worker processes, and every front end.

It speaks the stage contract so that neither the scheduler nor the worker knows it is
there. Each request's call runs on a thread of its own, paused in the pipeline's
``callback_on_step_end`` until the worker asks for the next step:

- ENCODE only records the request (the pipeline encodes its own prompt, so that work
  lands in the first step);
- each DENOISE step lets the call run to its next callback (the first one starts it);
- DECODE lets it run to the end (the VAE and post-processing) and takes its images.

Only one call computes at a time: the worker waits while a call runs. Dropping a state
(abort, a failed task) raises inside the paused call, which unwinds it. Each call runs on
a shallow copy of the pipeline with a scheduler of its own, because diffusers schedulers
and pipelines keep per-call state (step index, guidance scale) on themselves.
``ModelInfo`` says ``step_batching=False`` (every request's batch key is its own),
``sequence_parallel=False`` and ``backend="pipeline"`` (no state moves between workers,
no previews): that is all the scheduler sees.
"""

from __future__ import annotations

import copy
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from engine.model_info import LatentSpec, ModelInfo
from engine.params import ImageParams

FAMILY = "diffusers"


class _Cancelled(BaseException):
    """Raised inside a paused call to unwind it (BaseException: pipelines catch no such thing)."""


@dataclass
class PipelineRun:
    """One request's pipeline call on its own thread; the worker steps it."""

    request_id: str
    params: ImageParams
    prompt: str
    kwargs: dict[str, Any]
    pipe: DiffusionPipeline
    device: torch.device | None = None  # a CUDA device is current per thread: the call's thread sets it
    step: int = 0
    latents: torch.Tensor | None = None
    images: np.ndarray | None = None
    error: BaseException | None = None
    finished: bool = False
    _go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    _paused: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    _cancelled: bool = False
    _thread: threading.Thread | None = None

    @property
    def num_steps(self) -> int:
        return self.params.num_inference_steps  # type: ignore[return-value]

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def n(self) -> int:
        return self.params.n

    def advance(self) -> bool:
        """Run the call to its next step callback (or its end); False once it has ended."""
        if self.finished:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"gfdit-pipeline-{self.request_id[:8]}",
                                            daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._paused.acquire()
        if self.error is not None:
            raise RuntimeError(f"the pipeline failed: {type(self.error).__name__}: {self.error}") from self.error
        return not self.finished

    def finish(self) -> np.ndarray:
        """Run the call to its end; its images as uint8 (n, H, W, 3)."""
        while self.advance():
            pass
        assert self.images is not None
        return self.images

    def cancel(self) -> None:
        """Unwind a paused call (or forget one that never started)."""
        if self._thread is not None and not self.finished:
            self._cancelled = True
            self._go.release()

    def _run(self) -> None:
        try:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            out = self.pipe(self.prompt, **self.kwargs, callback_on_step_end=self._on_step_end)
            array = out.images if hasattr(out, "images") else out[0]
            # The same rounding as diffusers' numpy_to_pil, so pixels equal output_type="pil".
            self.images = (np.asarray(array) * 255).round().astype(np.uint8)
        except _Cancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - handed to the worker, which fails the request
            self.error = exc
        finally:
            self.finished = True
            self._paused.release()

    def _on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if "latents" in tensors:
            self.latents = tensors["latents"]
        self._paused.release()
        self._go.acquire()
        if self._cancelled:
            raise _Cancelled
        return tensors


class PipelineFallback:
    """Runs a diffusers pipeline per request behind the stage contract (module docstring)."""

    family = FAMILY

    def __init__(self, pipe: DiffusionPipeline, name: str, default_size: int | None = None,
                 default_steps: int | None = None) -> None:
        self.pipe = pipe
        self.name = name
        self.pipeline_class = type(pipe).__name__
        self._signature = inspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" not in self._signature:
            raise ValueError(f"pipeline class {self.pipeline_class} takes no callback_on_step_end: "
                             "the fallback cannot step it")
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        self.transformer = denoiser  # what the worker would give sequence-parallel processors: none here
        self.device = denoiser.device if denoiser is not None else pipe.device
        self.dtype = denoiser.dtype if denoiser is not None else torch.float32
        self._default_size = default_size or self._pipeline_default_size()
        self._default_steps = default_steps or self._call_default("num_inference_steps", 50)
        self._info: ModelInfo | None = None

    # ----- description -------------------------------------------------------------
    def _call_default(self, name: str, fallback: Any) -> Any:
        param = self._signature.get(name)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            return fallback
        return param.default

    def _vae_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8) or 8)

    def _pipeline_default_size(self) -> int:
        sample = getattr(self.pipe, "default_sample_size", None)
        if sample is None and self.transformer is not None:
            sample = getattr(self.transformer.config, "sample_size", None)
        if isinstance(sample, int):
            return sample * self._vae_factor()
        return self._call_default("height", 512)

    def latent_spec(self) -> LatentSpec:
        config = self.transformer.config if self.transformer is not None else {}
        patch = config.get("patch_size", 1) or 1
        vae = getattr(self.pipe, "vae", None)
        channels = vae.config.get("latent_channels", 4) if vae is not None else 4
        return LatentSpec(channels=int(channels), spatial_compression=self._vae_factor(),
                          patch_size=int(patch if isinstance(patch, int) else patch[-1]))

    def info(self) -> ModelInfo:
        if self._info is None:
            guidance = "cfg" if "guidance_scale" in self._signature else "none"
            true_cfg = self._call_default("true_cfg_scale", None) if "true_cfg_scale" in self._signature else None
            self._info = ModelInfo(
                name=self.name, family=self.family, default_width=self._default_size,
                default_height=self._default_size, default_steps=self._default_steps,
                default_guidance=float(self._call_default("guidance_scale", 1.0)),
                default_true_cfg_scale=None if true_cfg is None else float(true_cfg),
                latent=self.latent_spec(), max_size=4096, num_heads=1, guidance=guidance,
                device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                step_batching=False, sequence_parallel=False, state_transfer=False, previews=False,
                per_request_lora=False, backend="pipeline")
        return self._info

    def rows(self, params: ImageParams) -> int:
        return params.n * self.info().rows_per_image(params)

    # ----- stages ------------------------------------------------------------------
    def call_kwargs(self, params: ImageParams) -> dict[str, Any]:
        """The pipeline's keyword arguments for ``params``: those its ``__call__`` takes."""
        wanted = {
            "negative_prompt": params.negative_prompt,
            "num_images_per_prompt": params.n,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "true_cfg_scale": params.true_cfg_scale,
            # The engine makes the size asked for, never an aspect-ratio bin of it.
            "use_resolution_binning": False,
        }
        kwargs = {k: v for k, v in wanted.items() if k in self._signature and v is not None}
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(params.seed)
        kwargs["output_type"] = "np"
        inputs = getattr(self.pipe, "_callback_tensor_inputs", ())
        if "callback_on_step_end_tensor_inputs" in self._signature and "latents" in inputs:
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        return kwargs

    def new_states(self, request_ids: list[str], prompts: list[str], params: list[ImageParams]) -> list[PipelineRun]:
        return [PipelineRun(rid, p, prompt, self.call_kwargs(p), self._pipe_for_one_call(), self.device)
                for rid, prompt, p in zip(request_ids, prompts, params)]

    def _pipe_for_one_call(self) -> DiffusionPipeline:
        """The pipeline's modules with a scheduler of its own (per-call state lives there)."""
        pipe = copy.copy(self.pipe)
        object.__setattr__(pipe, "scheduler", copy.deepcopy(self.pipe.scheduler))
        return pipe

    def denoise(self, states: list[PipelineRun]) -> None:
        for state in states:
            if not state.advance():
                # The call took fewer steps than asked (its scheduler decides): it has ended.
                state.step = state.num_steps
            else:
                state.step = min(state.step + 1, state.num_steps)

    def decode(self, states: list[PipelineRun]) -> list[np.ndarray]:
        return [state.finish() for state in states]

    def preview(self, state: PipelineRun) -> np.ndarray:
        raise NotImplementedError("the whole-pipeline fallback makes no previews")

    def release(self, state: PipelineRun) -> None:
        state.cancel()
