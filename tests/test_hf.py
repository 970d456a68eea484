"""Hugging Face interop: `homestar export` loads in transformers and computes what homestar does;
`homestar train --init-from` starts from a transformers GPT-2 folder with transformers' loss.

Every transformers call is offline (HF_HUB_OFFLINE, local_files_only): models are built here from
a GPT2Config with random weights, never downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra; part of the `test` extra

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from homestar.cli import main  # noqa: E402
from homestar.data import TokenStream  # noqa: E402
from homestar.hf import read_tokenizer, read_weights  # noqa: E402
from homestar.model import GPT, GPTConfig  # noqa: E402
from homestar.train.build import load_run_data  # noqa: E402
from homestar.train.config import RunConfig  # noqa: E402
from homestar.train.generate import load_weights_only  # noqa: E402
from train_helpers import make_corpus, step_losses  # noqa: E402

RUN_FLAGS = ["--device", "cpu", "--micro-batch", "2", "--seq-len", "32", "--steps", "3", "--sample-every", "0",
             "--eval-every", "0", "--headless"]
EOT = "<|endoftext|>"
TEXTS = ["def main(argv):\n    return 0\n", " leading space, é and 中文", f"a{EOT}b", "\t\tx = [1, 2]  # note"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------ a small random GPT-2 folder


def _gpt2_tokenizer(corpus: Path, vocab: int) -> Tokenizer:
    """A byte-level BPE laid out as GPT-2's: merges first, `<|endoftext|>` the last id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text() for p in sorted(corpus.iterdir())), trainer)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def _save_gpt2(folder: Path, tok: Tokenizer, *, tied: bool = True, seed: int = 0, **shape):
    """A random GPT2LMHeadModel (biases and norms perturbed too) saved with save_pretrained."""
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, tie_word_embeddings=tied, bos_token_id=tok.token_to_id(EOT),
                                     eos_token_id=tok.token_to_id(EOT), **shape)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # nonzero biases, LayerNorms off 1/0: a mix-up shows
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    corpus = make_corpus(root / "corpus")
    folder = root / "tiny-gpt2"
    _save_gpt2(folder, _gpt2_tokenizer(corpus, 512))
    return folder


def _hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()


def _hf_loss_on_first_batch(run: Path, folder: Path) -> float:
    """transformers' own (shifted) LM loss on the run's first micro-batch: the window x plus the
    last target, labels = input ids, so it scores exactly the (x, y) pairs homestar trained on."""
    config = RunConfig.load(run)
    data = load_run_data(config, run)
    x, y = TokenStream(data.train, seq_len=config.seq_len, micro_batch=config.micro_batch,
                       seed=config.seed).batch_at(0)
    ids = torch.cat([x, y[:, -1:]], dim=1)
    with torch.no_grad():
        return float(_hf_model(folder)(input_ids=ids, labels=ids).loss)


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The debug preset trained 3 steps, then `homestar export`ed: (run_dir, out_dir)."""
    root = tmp_path_factory.mktemp("export")
    corpus, run, out = make_corpus(root / "corpus"), root / "run", root / "hf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOMESTAR_HOME", str(root / "home"))
        assert main(["train", "--preset", "debug", *RUN_FLAGS, "--runtime", "torch", "--data", str(corpus),
                     "--run-dir", str(run)]) == 0
        assert main(["export", str(run), str(out)]) == 0
    return run, out


def test_export_logits_match_homestar(exported):
    run, out = exported
    config = RunConfig.load(run)
    model = GPT(GPTConfig(**config.model))
    model.load_state_dict(load_weights_only(run), strict=False)  # strict=False: the tied head is wte
    model.eval()
    hf = _hf_model(out)
    assert hf.dtype == torch.float32 and hf.config.n_positions == 32 and hf.config.vocab_size == 4096
    idx = torch.randint(0, config.model["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 0.1  # a trained model, not near-zero logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_generates_what_sample_prints(exported, capsys):
    run, out = exported
    prompt = "def main(argv):"
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", prompt, "--tokens", "20", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer.from_file(str(run / "tokenizer.json")).encode(prompt).ids
    # eos_token_id=None: generate all 20 tokens, as `homestar sample` does, even past <|endoftext|>.
    generated = _hf_model(out).generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    assert generated.shape[1] == ids.shape[1] + 20
    text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert printed == prompt + text + "\n"


def test_exported_tokenizer_encodes_like_the_run(exported):
    run, out = exported
    ours = Tokenizer.from_file(str(run / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert theirs.eos_token == EOT and theirs.eos_token_id == ours.token_to_id(EOT)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text).ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_export_refusals(exported, tmp_path, capsys, monkeypatch):
    run, _ = exported
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["export", str(run), str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "a"), "--step", "2"]) == 2
    assert "no checkpoint at step 2 (saved steps: 3)" in capsys.readouterr().err
    odd = tmp_path / "odd"
    shutil.copytree(run, odd)
    raw = json.loads((odd / "config.json").read_text())
    raw["model"]["rotary"] = True
    (odd / "config.json").write_text(json.dumps(raw))
    assert main(["export", str(odd), str(tmp_path / "b")]) == 2
    assert "GPT-2 cannot express" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    assert main(["export", str(run), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install homestar[hf]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "odd"]  # no half-written folder left


def test_export_bf16_at_a_step(tmp_path, homestar_home, corpus_dir):
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--preset", "debug", *RUN_FLAGS, "--steps", "2", "--save-every", "1", "--runtime",
                 "torch", "--data", str(corpus_dir), "--run-dir", str(run)]) == 0
    assert main(["export", str(run), str(out), "--step", "1", "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    hf = _hf_model(out)
    from homestar.train.checkpoint import load_weights as checkpoint_weights

    step, weights = checkpoint_weights(run, 1)
    assert step == 1
    torch.testing.assert_close(hf.transformer.h[0].attn.c_attn.weight.float(),
                               weights["h.0.attn.c_attn.weight"].t().bfloat16().float(), atol=0, rtol=0)


def test_export_untied_head(exported, tmp_path):
    from homestar.train.checkpoint import save_checkpoint

    run, out = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(exported[0], run)
    shutil.rmtree(run / "checkpoints")
    raw = json.loads((run / "config.json").read_text())
    raw["model"]["tie_embeddings"] = False
    (run / "config.json").write_text(json.dumps(raw))
    weights = load_weights_only(exported[0])
    weights["lm_head.weight"] = torch.randn_like(weights["wte.weight"])
    save_checkpoint(run, 5, {"weights": weights, "optimizer": {"step": 0, "exp_avg": {}, "exp_avg_sq": {}}},
                    {"step": 5})
    assert main(["export", str(run), str(out)]) == 0
    model = GPT(GPTConfig(**raw["model"]))
    model.load_state_dict(weights)
    hf = _hf_model(out)
    assert not hf.config.tie_word_embeddings
    idx = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx)[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ reading a GPT-2 folder


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("file_format", ["safetensors", "sharded", "bin"])
def test_read_weights_computes_like_transformers(tmp_path, gpt2_dir, tied, file_format):
    folder = tmp_path / "m"
    tok = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    hf = _save_gpt2(folder, tok, tied=tied, seed=1)
    if file_format == "bin":  # the older format: a pickled state dict of GPT2LMHeadModel's names
        (folder / "model.safetensors").unlink()
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    if file_format == "sharded":  # what save_pretrained writes for large models: shards + an index
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    shape = GPTConfig(vocab_size=512, seq_len=16, d_model=32, n_layer=2, n_head=2, tie_embeddings=tied)
    model = GPT(shape)
    model.load_state_dict(read_weights(folder, shape), strict=tied is False)
    model.eval()
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_vocab_and_merges_tokenizer_matches_tokenizer_json(tmp_path, gpt2_dir):
    full = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    vocab = full.get_vocab(with_added_tokens=True)  # GPT-2's vocab.json lists <|endoftext|> too
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = json.loads(full.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    converted = read_tokenizer(tmp_path, vocab_size=512)
    assert converted.token_to_id(EOT) == 511
    for text in TEXTS:
        assert converted.encode(text).ids == full.encode(text).ids
        assert converted.decode(full.encode(text).ids) == full.decode(full.encode(text).ids)


# ------------------------------------------------------------------ train --init-from


@pytest.mark.parametrize("runtime", [["--runtime", "torch"], ["--runtime", "chunked", "--gpu-mem-gib", "0.01"]],
                         ids=["torch", "chunked"])
def test_init_from_first_loss_is_transformers_loss(tmp_path, homestar_home, corpus_dir, gpt2_dir, runtime):
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(gpt2_dir), *RUN_FLAGS, *runtime, "--data", str(corpus_dir),
                 "--run-dir", str(run)]) == 0
    first = step_losses(run)[1]
    expected = _hf_loss_on_first_batch(run, gpt2_dir)
    assert abs(expected - 6.238) > 0.05  # not the loss of uniform logits, log(512)
    assert first == pytest.approx(expected, abs=1e-4)
    config = RunConfig.load(run)
    assert config.init_from == str(gpt2_dir.resolve()) and config.preset == "tiny-gpt2"
    assert config.model == {"vocab_size": 512, "seq_len": 32, "d_model": 32, "n_layer": 2, "n_head": 2,
                            "tie_embeddings": True}
    assert (Tokenizer.from_file(str(run / "tokenizer.json")).to_str()
            == Tokenizer.from_file(str(gpt2_dir / "tokenizer.json")).to_str())


def test_init_from_resume_before_first_checkpoint_starts_from_the_folder(tmp_path, homestar_home, corpus_dir,
                                                                         gpt2_dir):
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(gpt2_dir), *RUN_FLAGS, "--steps", "1", "--runtime", "torch",
                 "--data", str(corpus_dir), "--run-dir", str(run)]) == 0
    first = step_losses(run)[1]
    shutil.rmtree(run / "checkpoints")  # as if it had been killed before saving anything
    assert main(["resume", str(run), "--steps", "1", "--headless"]) == 0
    assert step_losses(run)[1] == first  # from the folder's weights again, not a random init
    # And back: the fine-tuned run exports as a GPT-2 that computes what homestar computes.
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    config = RunConfig.load(run)
    model = GPT(GPTConfig(**config.model))
    model.load_state_dict(load_weights_only(run), strict=False)
    hf = _hf_model(out)
    assert hf.config.eos_token_id == 511 and hf.config.n_positions == 32
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx)[0], atol=1e-4, rtol=0)


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("homestar: error: ") and err.count("\n") == 1
    return err


def test_init_from_refusals(tmp_path, homestar_home, corpus_dir, gpt2_dir, capsys):
    run = tmp_path / "run"
    base = ["train", *RUN_FLAGS, "--data", str(corpus_dir), "--run-dir", str(run)]
    assert "no such folder" in _refused([*base, "--init-from", str(tmp_path / "nope")], capsys)
    assert "--preset cannot be combined" in _refused([*base, "--init-from", str(gpt2_dir), "--preset", "debug"],
                                                     capsys)
    long = [a if a != "32" else "128" for a in base]
    assert "longer than the 64 positions" in _refused([*long, "--init-from", str(gpt2_dir)], capsys)
    for name, change, message in [("llama", {"model_type": "llama"}, "is not GPT-2"),
                                  ("relu", {"activation_function": "relu"}, "activation 'relu'"),
                                  ("deeper", {"n_layer": 3}, "do not match its config.json")]:
        other = tmp_path / name
        shutil.copytree(gpt2_dir, other)
        raw = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**raw, **change}))
        assert message in _refused([*base, "--init-from", str(other)], capsys)
    assert not run.exists()  # nothing was created by a refused command


def test_nothing_imports_transformers_unless_asked():
    code = ("import sys, homestar.cli, homestar.hf, homestar.train.session, homestar.runtime, homestar.model; "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
