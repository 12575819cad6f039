"""Each way a model argument can be wrong gets one line that says what was tried and what to do."""

import pytest

from engine.models.sources import ModelLoadError, check_model_source


def one_line_error(model: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        check_model_source(model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_presets_and_pipeline_folders_pass(tmp_path):
    assert check_model_source("shapes") == "preset"
    assert check_model_source("tiny-pixart") == "preset"
    (tmp_path / "model_index.json").write_text("{}")
    assert check_model_source(str(tmp_path)) == "folder"


def test_an_unknown_preset_lists_the_presets():
    message = one_line_error("tiny-pixrt")
    assert "unknown model 'tiny-pixrt'" in message and "shapes" in message and "tiny-pixart" in message


def test_a_missing_folder_says_it_does_not_exist(tmp_path):
    message = one_line_error(str(tmp_path / "nowhere"))
    assert "does not exist" in message and str(tmp_path / "nowhere") in message
    assert "preset" in message


def test_a_folder_that_is_not_a_pipeline_says_so(tmp_path):
    assert "no model_index.json" in one_line_error(str(tmp_path))


def test_a_hub_id_that_cannot_be_fetched_says_what_to_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error("gfdit-test/no-such-model")
    assert "could not fetch 'gfdit-test/no-such-model' from the Hugging Face hub" in message
    assert "network" in message and "preset" in message
