"""The cost model: profile JSON in, fitted stage times out (no torch)."""

import json
import subprocess
import sys

import pytest

from engine.messages import Stage
from engine.scheduler.cost_model import CostModel, fit_points
from engine.scheduler.profile import (
    MigrationSpec,
    Point,
    Profile,
    ProfileError,
    shipped_profile_for,
    shipped_profiles,
)
from tests.scheduling_helpers import batching_model, h20


def test_the_h20_profile_reproduces_the_published_step_times():
    cm = h20()
    published = {(512, 1): 155, (512, 2): 161, (512, 4): 172, (1536, 1): 1557, (1536, 2): 880, (1536, 4): 464}
    for (size, degree), ms in published.items():
        assert cm.step_s(cm.tokens(size, size), 1, degree) == pytest.approx(ms / 1e3, rel=1e-6)
    assert cm.degrees == (1, 2, 4)
    assert cm.tokens(1024, 1024) == 4096


def test_between_the_points_the_h20_fit_is_ordered_and_wider_helps_only_large_images():
    cm = h20()
    t = cm.tokens(1024, 1024)
    one, two, four = (cm.step_s(t, 1, d) for d in (1, 2, 4))
    assert cm.step_s(1024, 1, 1) < one < cm.step_s(9216, 1, 1)
    assert four < two < one  # a 1024x1024 step gets faster with the degree
    small = cm.tokens(512, 512)
    assert cm.fastest_degree(small, 1, (1, 2, 4)) == 1
    assert cm.fastest_degree(cm.tokens(1536, 1536), 1, (1, 2, 4)) == 4


def test_the_fit_reads_a_constant_as_a_per_step_cost_only_when_the_data_show_one():
    cm = h20()
    # Degree 1 grows a little faster than linearly from 512 to 1536: no fixed cost, batching does not pay.
    a, _, b, c = cm.fit("denoise", 1).coef
    assert a == 0 and b > 0 and c > 0
    assert cm.step_s(1024, 4, 1) == pytest.approx(4 * cm.step_s(1024, 1, 1))
    # Degree 4 has a large constant (collectives): a batch of 4 costs far less than 4 steps.
    a4 = cm.fit("denoise", 4).coef[0]
    assert a4 > 100
    assert cm.step_s(1024, 4, 4) == pytest.approx(4 * cm.step_s(1024, 1, 4) - 3 * a4 / 1e3)


def test_the_fit_recovers_known_coefficients_from_batched_points():
    truth = (20.0, 3.0, 0.05, 1e-5)
    points = [(t, b, truth[0] + b * (truth[1] + truth[2] * t + truth[3] * t * t))
              for t in (256, 1024, 4096) for b in (1, 2, 4)]
    fit = fit_points(points)
    assert fit.coef == pytest.approx(truth, rel=1e-6)
    assert fit.rel_rms < 1e-9


def test_noisy_points_still_give_non_negative_coefficients():
    points = [(256, 1, 10.0), (256, 2, 9.0), (1024, 1, 30.0), (1024, 4, 100.0), (4096, 1, 140.0)]
    fit = fit_points(points)
    assert all(c >= 0 for c in fit.coef)
    assert fit.ms(1024, 1) == pytest.approx(30.0, rel=0.3)


def test_stages_without_points_cost_nothing_and_unknown_degrees_raise():
    cm = h20()
    assert cm.stage_s(Stage.ENCODE, 1024, 1) == 0 and cm.stage_s(Stage.DECODE, 1024, 4) == 0
    with pytest.raises(ProfileError, match="degree 8"):
        cm.step_s(1024, 1, 8)
    assert cm.request_s(1024, 50) == pytest.approx(50 * 0.155)


def test_migration_cost_and_its_override():
    cm = h20()
    one = cm.migration_s(1024, 1)
    assert one == pytest.approx((1.0 + 0.0734 + 1.28e-6 * 1024) / 1e3, rel=1e-6)
    assert cm.migration_s(1024, 2) > one
    flat = cm.with_migration(50.0)
    assert flat.migration_s(9216, 1) == pytest.approx(0.05)
    assert flat.step_s(1024) == cm.step_s(1024)
    assert MigrationSpec().cost_ms(4096, 3) == 0


def test_profiles_round_trip_and_bad_ones_are_refused(tmp_path):
    cm = batching_model()
    path = tmp_path / "p.json"
    cm.profile.save(path)
    again = CostModel.load(path)
    assert again.step_s(1024, 4, 2) == pytest.approx(cm.step_s(1024, 4, 2))
    data = json.loads(path.read_text())
    for broken, message in [({**data, "schema": 9}, "schema"), ({**data, "points": []}, "denoise point"),
                            ({**data, "points": [{**data["points"][0], "ms": -1}]}, "out of range"),
                            ({**data, "points": [{**data["points"][0], "stage": "vae"}]}, "unknown stage"),
                            ({k: v for k, v in data.items() if k != "size_multiple"}, "malformed")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(ProfileError, match=message):
            Profile.load(path)
    with pytest.raises(ProfileError, match="no shipped profile"):
        Profile.load("no_such_profile")


def test_shipped_profiles_load_and_are_found_by_model():
    assert {"h20_qwen_image", "cpu_small_pixart"} <= set(shipped_profiles())
    for name in shipped_profiles():
        cm = CostModel.load(name)
        assert 1 in cm.degrees
        for point in cm.profile.points:  # every fit stays close to what was measured
            predicted = cm.stage_s(Stage[point.stage.upper()], cm.tokens(point.width, point.height), point.batch,
                                   point.degree)
            assert predicted == pytest.approx(point.ms / 1e3, rel=0.35), point
    assert shipped_profile_for("small-pixart") == "cpu_small_pixart"
    assert shipped_profile_for("no-such-model") is None


def test_points_of_one_stage_fit_per_degree():
    profile = Profile("m", 16, 10, (Point("denoise", 512, 512, 1, 1, 100.0), Point("denoise", 512, 512, 1, 2, 60.0),
                                    Point("decode", 512, 512, 1, 1, 40.0)))
    cm = CostModel(profile)
    assert cm.step_s(1024, 1, 2) == pytest.approx(0.06)
    assert cm.stage_s(Stage.DECODE, 1024, 1, 2) == pytest.approx(0.04)  # decode ignores the degree


def test_the_cost_model_imports_without_torch():
    code = ("import sys; import engine.scheduler.cost_model, engine.scheduler.elastic, engine.sim.simulator; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
