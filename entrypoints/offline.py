"""``DiT``: the synchronous Python API, like ``vllm.LLM``, over the same AsyncEngine.

The engine runs on an event loop in a background thread owned by the ``DiT`` object, so
``generate`` can submit every request at once and let the engine batch them.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from PIL import Image
from tqdm import tqdm

from engine.async_engine import AsyncEngine
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.messages import ModelInfo
from engine.outputs import RequestMetrics, RequestOutput
from engine.params import ImageParams, InvalidParamsError, check_prompt

T = TypeVar("T")


@dataclass
class ImageOutput:
    """The images of one prompt, with the seed that remakes them and the request's timings."""

    request_id: str
    prompt: str
    images: list[Image.Image]
    params: ImageParams
    metrics: RequestMetrics | None = None
    latents: Any = field(default=None, repr=False)
    # Denoise steps that ran every transformer block, and those the step cache reused.
    computed_steps: int = 0
    cached_steps: int = 0

    @property
    def seed(self) -> int:
        return self.params.seed  # type: ignore[return-value]

    def save(self, path: str | Path) -> list[Path]:
        """Save to ``path`` (one image) or ``stem_k.suffix`` (several); returns the paths."""
        path = Path(path)
        paths = [path] if len(self.images) == 1 else [
            path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(len(self.images))]
        for image, target in zip(self.images, paths):
            image.save(target)
        return paths


class _LoopThread:
    """An event loop running in a daemon thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gfdit-engine", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[return-value]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


def _count_images(bar: tqdm, future: asyncio.Future[RequestOutput]) -> None:
    if not future.cancelled() and future.exception() is None:
        bar.update(future.result().params.n)


def _close(runner: _LoopThread, engine: AsyncEngine) -> None:
    try:
        runner.run(engine.shutdown())
    finally:
        runner.stop()


class DiT:
    """Generate images offline.

    >>> dit = DiT(model="tiny-pixart", max_batch_size=16)
    >>> outputs = dit.generate(["a red fox", "a blue cat"], ImageParams(seed=1))
    >>> outputs[0].images[0].save("fox.png")
    """

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        config = EngineConfig.create(model=model, **engine_options)
        self._runner = _LoopThread()
        try:
            self.engine = self._runner.run(AsyncEngine.create(config))
        except BaseException:
            self._runner.stop()
            raise
        self._finalizer = weakref.finalize(self, _close, self._runner, self.engine)

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info  # type: ignore[return-value]

    def generate(self, prompts: str | Sequence[str], params: ImageParams | Sequence[ImageParams] | None = None,
                 *, use_tqdm: bool = True) -> list[ImageOutput]:
        """Generate for every prompt, all submitted at once; outputs come in prompt order.

        ``params`` is one ImageParams for all prompts or a list with one per prompt. Every
        prompt and params is checked before anything runs (InvalidParamsError names the
        bad field and its index). A failed request raises RequestFailedError.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        param_list = self._param_list(params, len(prompt_list))
        for i, (prompt, p) in enumerate(zip(prompt_list, param_list)):
            try:
                check_prompt(prompt, self.engine.config.limits, self.engine.model_info)
                self.engine.resolve_params(p)
            except InvalidParamsError as exc:
                raise InvalidParamsError(f"request {i}: {exc}", exc.param) from exc
        total = sum(p.n for p in param_list)
        bar = tqdm(total=total, desc="images", unit="img", disable=not use_tqdm)
        futures = [self._runner.submit(self._final(prompt, p)) for prompt, p in zip(prompt_list, param_list)]
        for future in futures:
            future.add_done_callback(lambda f: _count_images(bar, f))
        try:
            finals = [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # aborts the requests still running
            raise
        finally:
            bar.close()
        return [ImageOutput(o.request_id, o.prompt, o.pil_images, o.params, o.metrics, o.latents,
                            o.computed_steps, o.cached_steps) for o in finals]

    @staticmethod
    def _param_list(params: ImageParams | Sequence[ImageParams] | None, count: int) -> list[ImageParams]:
        if params is None or isinstance(params, ImageParams):
            param_list = [params or ImageParams()] * count
        else:
            param_list = list(params)
            if len(param_list) != count:
                raise InvalidParamsError(f"got {count} prompts but {len(param_list)} params", "params")
        # Nothing leaves the process here, so skip image encoding unless a format was asked for.
        return [p if p.output_format is not None else msgspec.structs.replace(p, output_format="raw")
                for p in param_list]

    async def _final(self, prompt: str, params: ImageParams) -> RequestOutput:
        final = None
        async for out in self.engine.generate(prompt, params):
            final = out
        assert final is not None and final.finished
        return final

    def close(self) -> None:
        """Stop the engine and its workers (also done when the object is collected)."""
        self._finalizer()

    def __enter__(self) -> DiT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
