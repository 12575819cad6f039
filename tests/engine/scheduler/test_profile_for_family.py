"""A shipped profile serves, by default, the model it was measured on or every model of its family."""

import msgspec

from engine.scheduler.factory import load_cost_model
from engine.scheduler.profile import Profile, shipped_profile_for
from tests.scheduling_helpers import MODEL


def test_the_h20_profile_serves_the_qwen_image_family_whatever_the_model_is_called():
    for name in ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512", "tiny-qwen-image", "/models/my-finetune"):
        info = msgspec.structs.replace(MODEL, name=name, family="qwen-image", guidance="true_cfg")
        cost_model = load_cost_model(None, info)
        assert cost_model is not None and cost_model.profile.family == "qwen-image"
        assert shipped_profile_for(name, "qwen-image") == "h20_qwen_image"
    # Matched by family, not by a name that merely looks alike.
    assert shipped_profile_for("qwen-image-lookalike", "pixart") is None
    assert load_cost_model(None, msgspec.structs.replace(MODEL, name="Qwen/Qwen-Image", family="flux")) is None


def test_a_profile_measured_on_one_model_stays_with_it():
    assert shipped_profile_for("small-pixart", "pixart") == "cpu_small_pixart"
    assert shipped_profile_for("tiny-pixart", "pixart") is None
    assert load_cost_model("cpu_small_pixart", MODEL).profile.model == "small-pixart"


def test_the_family_round_trips_through_json(tmp_path):
    profile = Profile.load("h20_qwen_image")
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json").family == "qwen-image"
    assert "family" not in Profile.load("cpu_small_pixart").to_dict()
