"""Presets: shipped shapes match their names, and the loader turns every bad file into ConfigError."""

from __future__ import annotations

import pytest
import torch

from homestar.errors import ConfigError
from homestar.model import GPT, list_presets, load_preset, load_preset_file, preset_names
from homestar.model import presets as presets_module

NOMINAL = {"125m": 125e6, "350m": 350e6, "0.7b": 0.7e9, "1.3b": 1.3e9, "2.7b": 2.7e9, "4b": 4e9,
           "6.7b": 6.7e9, "13b": 13e9}

VALID = """\
name = "tiny"
description = "a test preset"
[model]
d_model = 64
n_layer = 2
n_head = 2
vocab_size = 256
seq_len = 32
[train]
lr = 1e-3
min_lr = 1e-4
warmup_steps = 5
micro_batch = 4
accum = 2
weight_decay = 0.1
grad_clip = 1.0
beta1 = 0.9
beta2 = 0.95
"""

def test_all_presets_ship_sorted_by_size():
    names = preset_names()
    assert set(names) == {"debug", *NOMINAL}
    assert names[0] == "debug" and names[-1] == "13b"
    sizes = [p.params for p in list_presets()]
    assert sizes == sorted(sizes)

@pytest.mark.parametrize("name", list(NOMINAL))
def test_big_preset_matches_its_name_without_allocating(name):
    preset = load_preset(name)
    config = preset.model
    with torch.device("meta"):
        model = GPT(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == config.num_params() == preset.params
    assert abs(counted / NOMINAL[name] - 1) <= 0.10
    assert config.vocab_size == 50304 and config.seq_len == 1024 and config.tie_embeddings
    assert config.d_model % 128 == 0 and config.head_dim in (64, 128)

def test_debug_preset_is_small_and_quick():
    preset = load_preset("debug")
    assert 1e6 <= preset.params <= 10e6
    assert preset.model.vocab_size <= 8192 and preset.model.seq_len == 128

def test_learning_rates_shrink_as_models_grow():
    lrs = [p.train.lr for p in list_presets()]
    assert lrs == sorted(lrs, reverse=True)
    for preset in list_presets():
        assert 0 < preset.train.min_lr < preset.train.lr

def test_fallback_to_source_tree_when_package_missing(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(presets_module.resources, "files", missing)
    assert load_preset("125m").params == 124_475_904

def test_installed_package_location_is_used_when_importable(monkeypatch, tmp_path):
    (tmp_path / "tiny.toml").write_text(VALID)
    monkeypatch.setattr(presets_module.resources, "files", lambda name: tmp_path)
    assert preset_names() == ["tiny"]

def test_load_valid_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(VALID)
    preset = load_preset_file(path)
    assert preset.name == "tiny" and preset.model.d_model == 64 and preset.model.tie_embeddings
    assert preset.train.lr == 1e-3 and preset.train.accum == 2
    assert isinstance(preset.train.grad_clip, float)

def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; choose one of: debug, 125m, 350m"):
        load_preset("huge")

@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("n_layer = 2", "n_layer = [2"), "broken TOML"),
        (lambda t: t.replace("n_head = 2\n", ""), "missing key model.n_head"),
        (lambda t: t.replace("lr = 1e-3\n", "", 1), "missing key train.lr"),
        (lambda t: t.replace("[train]", "[training]"), "unknown key training"),
        (lambda t: t.replace("d_model = 64", 'd_model = "64"'), "model.d_model must be int"),
        (lambda t: t.replace("micro_batch = 4", "micro_batch = 4.5"), "train.micro_batch must be int"),
        (lambda t: t.replace("accum = 2", "accum = true"), "train.accum must be int"),
        (lambda t: t.replace("beta2 = 0.95", 'beta2 = "high"'), "train.beta2 must be float or int"),
        (lambda t: t.replace("seq_len = 32", "seq_len = 32\ntie_embeddings = 1"), "tie_embeddings must be bool"),
        (lambda t: t.replace("seq_len = 32", "seq_len = 32\ndropout = 0.1"), "unknown key model.dropout"),
        (lambda t: t.replace("n_head = 2", "n_head = 3"), "multiple of n_head"),
        (lambda t: t.replace("min_lr = 1e-4", "min_lr = 1e-2"), "min_lr"),
        (lambda t: 'name = "x"\nmodel = 3\n' + t[t.index("[train]"):], "model must be table"),
    ],
)
def test_bad_file_raises_config_error_naming_it(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(VALID))
    with pytest.raises(ConfigError, match=message) as info:
        load_preset_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value).strip()

def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset_file(tmp_path / "nope.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_preset_file(binary)
