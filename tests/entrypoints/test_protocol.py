"""The wire types: one-pass decoding names the bad field; answers parse as the SDK's models."""

from __future__ import annotations

import msgspec
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent, ImagesResponse

from entrypoints.protocol import (
    APIError,
    CompletedEvent,
    ImageObject,
    PartialImageEvent,
    Usage,
    decode_generation_request,
)
from entrypoints.protocol import ImagesResponse as Response
from entrypoints.serving_images import parse_size, steps_for_quality


def test_a_minimal_request_leaves_every_default_to_the_server():
    req = decode_generation_request(b'{"prompt": "a fox"}')
    assert req.prompt == "a fox" and req.n is None and req.size is None and req.quality is None
    req = decode_generation_request(b'{"prompt": "a fox", "n": null, "seed": 7, "guidance_scale": 3}')
    assert req.n is None and req.seed == 7 and req.guidance_scale == 3.0
    req = decode_generation_request(b'{"prompt": "a fox", "priority": 2, "deadline_s": 1.5}')
    assert req.priority == 2 and req.deadline_s == 1.5


@pytest.mark.parametrize("body, param, code", [
    (b'{}', "prompt", "missing_required_parameter"),
    (b'{"prompt": "a", "steps": 3}', "steps", "unknown_parameter"),
    (b'{"prompt": "a", "n": "2"}', "n", "invalid_value"),
    (b'{"prompt": "a", "n": 0}', "n", "invalid_value"),
    (b'{"prompt": "a", "partial_images": 4}', "partial_images", "invalid_value"),
    (b'{"prompt": "a", "quality": "best"}', "quality", "invalid_value"),
    (b'{"prompt": "a", "seed": -1}', "seed", "invalid_value"),
    (b'{"prompt": "a", "deadline_s": 0}', "deadline_s", "invalid_value"),
    (b'{"prompt": "a", "priority": 1.5}', "priority", "invalid_value"),
    (b'{"prompt": "a", "cache": "fbcache"}', "cache", "invalid_value"),
    (b'{"prompt": "a", "cache": {"threshold": "high"}}', "cache", "invalid_value"),
    (b'{"prompt": "a", "cache": {"method": "fbcache", "bogus": 1}}', "cache", "unknown_parameter"),
    (b'[]', None, "invalid_value"),
    (b'{"prompt": ', None, "invalid_json"),
])
def test_a_bad_body_is_a_400_naming_the_field(body, param, code):
    with pytest.raises(APIError) as info:
        decode_generation_request(body)
    error = msgspec.json.decode(info.value.body())["error"]
    assert info.value.status == 400 and error["param"] == param and error["code"] == code
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_sizes_and_quality_steps():
    assert parse_size(None) == parse_size("auto") == (None, None)
    assert parse_size("512x256") == (512, 256)
    for bad in ("512", "512x", "0x16", "16X16", "16x16x16", " 16x16", "abc"):
        with pytest.raises(APIError) as info:
            parse_size(bad)
        assert info.value.param == "size"
    # Fractions of the model's default steps: low 1/4, medium 1/2, high and auto all of them.
    assert [steps_for_quality(q, 20) for q in ("low", "medium", "high", "auto")] == [5, 10, 20, 20]
    assert [steps_for_quality(q, 28) for q in ("low", "medium", "high", "auto")] == [7, 14, 28, 28]
    assert steps_for_quality("low", 2) == 1


def test_answers_parse_as_the_openai_sdk_models():
    usage = Usage(output_tokens=32, total_tokens=32)
    body = msgspec.json.encode(Response(created=1, data=[ImageObject(b64_json="aGk=")], size="64x64",
                                        output_format="png", quality="high", background="opaque", usage=usage))
    parsed = ImagesResponse.model_validate_json(body)
    assert parsed.data[0].b64_json == "aGk=" and parsed.data[0].url is None and parsed.usage.output_tokens == 32
    partial = msgspec.json.encode(PartialImageEvent("aGk=", "opaque", 1, "png", 0, "high", "64x64"))
    assert ImageGenPartialImageEvent.model_validate_json(partial).type == "image_generation.partial_image"
    done = msgspec.json.encode(CompletedEvent("aGk=", "opaque", 1, "png", "high", "64x64", usage))
    assert ImageGenCompletedEvent.model_validate_json(done).usage.total_tokens == 32
