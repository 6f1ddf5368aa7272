"""The one loader: every kind of output the project writes, and a Hugging Face GPT-2 folder, opened by
minigpt.checkpoint.load with the same outputs as the model that was saved; mixed-up kinds refused by name."""

import json

import pytest
import torch
from conftest import save_folder, tiny_gpt

import peft
from minigpt import checkpoint, tasks
from minigpt.checkpoint import load, load_checkpoint, load_resume_checkpoint, save_checkpoint
from minigpt.pretrained import save_gpt2
from minigpt.tokenizer import BPETokenizer, gpt2_byte_encoder
from rlhf.reward_model import RewardModel, load_reward_model, save_reward_model

X = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 8, 0, 6, 2]])


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)[0]


def test_a_full_model_folder_round_trips_with_its_description(tmp_path, bpe_tok):
    model = tiny_gpt(bpe_tok.vocab_size)
    folder = checkpoint.save_model(tmp_path / "m", model, bpe_tok, "sft", template=tasks.TEMPLATE,
                                   made_from={"base": "somewhere"}, settings={"lr": 1e-3})
    assert {p.name for p in folder.iterdir()} == {"model.json", "model.safetensors", "tokenizer.json"}
    loaded = load(folder)
    assert torch.equal(logits(loaded.model), logits(model))
    assert loaded.model.output_layer.head.weight is loaded.model.input_layer.wte.weight  # still tied
    info = json.loads((folder / "model.json").read_text())
    assert info["stage"] == "sft" and info["kind"] == "gpt" and info["template"] == tasks.TEMPLATE
    assert info["made_from"] == {"base": "somewhere"} and info["settings"] == {"lr": 1e-3}
    assert loaded.tokenizer.to_dict() == bpe_tok.to_dict()
    for f in folder.iterdir():  # readable by others, like every file the project writes
        assert f.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("config", [peft.LoraConfig(r=2), peft.PromptTuningConfig(num_virtual_tokens=3),
                                    peft.IA3Config(), peft.BitFitConfig()], ids=lambda c: c.method)
def test_an_adapter_folder_opens_on_its_base_even_after_both_move(tmp_path, bpe_tok, config):
    base = tiny_gpt(bpe_tok.vocab_size)
    save_folder(tmp_path / "run" / "base", base, bpe_tok)
    peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    checkpoint.save_model(tmp_path / "run" / "sft", base, bpe_tok, "sft", base=tmp_path / "run" / "base")
    assert (tmp_path / "run" / "sft" / "adapter.safetensors").is_file()
    assert not (tmp_path / "run" / "sft" / "model.safetensors").exists()
    (tmp_path / "run").rename(tmp_path / "moved")  # the relative path to the base still holds
    loaded = load(tmp_path / "moved" / "sft")
    assert loaded.model.peft_config == config
    assert torch.equal(logits(loaded.model), logits(base))


def test_a_training_checkpoint_and_a_run_folder_open_too(tmp_path, bpe_tok):
    model, latest = tiny_gpt(bpe_tok.vocab_size), tiny_gpt(bpe_tok.vocab_size, seed=1)
    for name, m in (("best.pt", model), ("ckpt.pt", latest)):
        info = checkpoint.describe(m, "pretrain", template=tasks.TEMPLATE)
        save_checkpoint(tmp_path / "run" / name, {"model": m.state_dict(), "tokenizer": bpe_tok.to_dict(),
                                                  "optimizer": {}, **info})
    for path in (tmp_path / "run" / "best.pt", tmp_path / "run"):  # a run folder opens its best.pt, not ckpt.pt
        loaded = load(path)
        assert torch.equal(logits(loaded.model), logits(model))
        assert loaded.info["path"] == str(tmp_path / "run" / "best.pt") and loaded.info["template"] == tasks.TEMPLATE


def test_resume_reads_ckpt_pt_and_falls_back_to_best_pt_only_when_it_is_damaged(tmp_path, capsys):
    """ckpt.pt (the latest iteration) is what a run resumes from; a damaged one gives way to best.pt, with a warning."""
    save_checkpoint(tmp_path / "ckpt.pt", {"iter": 7})
    save_checkpoint(tmp_path / "best.pt", {"iter": 4})
    assert load_resume_checkpoint(tmp_path)["iter"] == 7 and capsys.readouterr().out == ""
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert load_resume_checkpoint(tmp_path)["iter"] == 4
    out = capsys.readouterr().out
    assert "is empty (0 bytes)" in out and "continuing from best.pt instead (iteration 4)" in out
    (tmp_path / "best.pt").unlink()
    with pytest.raises(ValueError, match="is empty"):
        load_resume_checkpoint(tmp_path)


def test_a_peft_run_checkpoint_opens_on_its_base_and_a_changed_base_is_refused(tmp_path, bpe_tok):
    """A checkpoint of the trained tensors only (save_trainable_only) goes on its base; a base since changed is refused."""
    base = tiny_gpt(bpe_tok.vocab_size)
    save_folder(tmp_path / "base", base, bpe_tok)
    peft.get_peft_model(base, peft.LoraConfig(r=2))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    info = checkpoint.describe(base, "sft", base=tmp_path / "base", where=tmp_path / "run")
    save_checkpoint(tmp_path / "run" / "ckpt.pt", {"model": {k: v for k, v in base.state_dict().items() if k in
                                                             trainable}, "tokenizer": bpe_tok.to_dict(), **info})
    assert torch.equal(logits(load(tmp_path / "run" / "ckpt.pt").model), logits(base))
    save_folder(tmp_path / "base", tiny_gpt(bpe_tok.vocab_size, layer_norm_eps=1e-3), bpe_tok)
    with pytest.raises(ValueError, match="but the adapter was trained on"):
        load(tmp_path / "run" / "ckpt.pt")


def test_a_checkpoint_of_the_wrong_kind_is_refused_before_its_weights_are_read(tmp_path):
    """expect= holds for training checkpoints too, older ones with a "reward_model" flag instead of "kind" included."""
    save_checkpoint(tmp_path / "rm.pt", {"model": {}, "model_config": {}, "tokenizer": {}, "stage": "reward",
                                         "reward_model": True})
    with pytest.raises(ValueError, match=r"rm.pt is a reward model \(stage 'reward'\); expected a language model"):
        load(tmp_path / "rm.pt", expect="gpt")
    save_checkpoint(tmp_path / "lm.pt", {"model": {}, "model_config": {}, "tokenizer": {}, "stage": "sft"})
    with pytest.raises(ValueError, match=r"lm.pt is a language model \(stage 'sft'\); expected a reward model"):
        load(tmp_path / "lm.pt", expect="reward")


def test_a_model_folder_missing_a_weight_is_refused(tmp_path, bpe_tok):
    """Only tied aliases may be absent from model.safetensors: a missing weight is an error, frozen PEFT ones too."""
    from safetensors.torch import load_file, save_file

    lora = tiny_gpt(bpe_tok.vocab_size)
    peft.get_peft_model(lora, peft.LoraConfig(r=2))  # saved without a base: every weight, fc frozen
    for name, model in (("plain", tiny_gpt(bpe_tok.vocab_size)), ("lora", lora)):
        folder = save_folder(tmp_path / name, model, bpe_tok)
        state = load_file(str(folder / "model.safetensors"))
        save_file({k: v for k, v in state.items() if k != "encoder.blocks.0.mlp.fc.weight"},
                  str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=r"do not fit .*missing \['encoder.blocks.0.mlp.fc.weight'\]"):
            load(folder)


def test_resaving_a_folder_in_the_other_form_leaves_only_that_forms_weights(tmp_path, bpe_tok):
    """An adapter written over a full model's folder removes its model.safetensors, and the other way round."""
    model = tiny_gpt(bpe_tok.vocab_size)
    save_folder(tmp_path / "base", model, bpe_tok)
    peft.get_peft_model(model, peft.LoraConfig(r=2))
    folder = save_folder(tmp_path / "sft", model, bpe_tok)
    save_folder(folder, model, bpe_tok, base=tmp_path / "base")
    assert {p.name for p in folder.iterdir()} == {"model.json", "adapter.safetensors", "tokenizer.json"}
    save_folder(folder, model, bpe_tok)
    assert {p.name for p in folder.iterdir()} == {"model.json", "model.safetensors", "tokenizer.json"}


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_write_that_fails_leaves_the_previous_checkpoint_and_no_model_json(tmp_path, bpe_tok, monkeypatch):
    """A crash mid-write keeps the old checkpoint readable; a folder cut off mid-save has no model.json (incomplete)."""
    import safetensors.torch

    save_checkpoint(tmp_path / "ckpt.pt", {"iter": 1})
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(tmp_path / "ckpt.pt", {"iter": 2, "bad": Unpicklable()})
    assert load_checkpoint(tmp_path / "ckpt.pt") == {"iter": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    model = tiny_gpt(bpe_tok.vocab_size)
    save_folder(tmp_path / "m", model, bpe_tok)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_folder(tmp_path / "m", model, bpe_tok)
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load(tmp_path / "m")


def test_a_reward_model_opens_as_a_reward_model_and_is_refused_as_a_language_model(tmp_path, bpe_tok):
    rm = RewardModel(tiny_gpt(bpe_tok.vocab_size))
    rm.gain.fill_(3.0)
    save_reward_model(rm, bpe_tok, tmp_path / "reward")
    loaded, _ = load_reward_model(tmp_path / "reward")
    with torch.no_grad():
        assert torch.equal(loaded(X), rm.eval()(X))
    with pytest.raises(ValueError, match=r"reward is a reward model \(stage 'reward'\); expected a language model"):
        load(tmp_path / "reward", expect="gpt")
    save_folder(tmp_path / "lm", tiny_gpt(bpe_tok.vocab_size), bpe_tok, "sft")
    with pytest.raises(ValueError, match=r"lm is a language model \(stage 'sft'\); expected a reward model"):
        load_reward_model(tmp_path / "lm")


def test_what_is_not_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model .*nowhere' does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model: expected model.json"):
        load(tmp_path / "empty")
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty \\(0 bytes\\)"):
        load_checkpoint(tmp_path / "zero.pt")
    (tmp_path / "text.pt").write_text("hello, I am text")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    save_checkpoint(tmp_path / "whole.pt", {"model": {"w": torch.ones(1000)}})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:-300])
    with pytest.raises(ValueError, match="cut.pt' is truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load(tmp_path / "whole.pt")


def write_gpt2_vocab(folder, tok: BPETokenizer):
    """vocab.json and merges.txt in GPT-2's spelling for a BPE tokenizer of ours without a pad token: token ids in
    merge order, bytes spelled through GPT-2's byte-to-character map, <|endoftext|> last."""
    enc = gpt2_byte_encoder()
    spell = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {spell(t): i for i, t in enumerate(tok.ranks)} | {"<|endoftext|>": tok.eos_token_id}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = []
    for t in tok.ranks[256:]:  # any split into two earlier tokens stands for the merge (only the order is checked)
        i = next(i for i in range(1, len(t)) if t[:i] in tok.rank_of and t[i:] in tok.rank_of)
        merges.append(f"{spell(t[:i])} {spell(t[i:])}")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_a_gpt2_folder_opens_with_its_tokenizer_from_vocab_json(tmp_path, bpe_tok):
    tok = BPETokenizer(bpe_tok.ranks, pad_token=False)  # GPT-2's layout: no pad token, padding with eos
    model = tiny_gpt(tok.vocab_size)
    save_gpt2(model, tmp_path / "gpt2", eos_token_id=tok.eos_token_id)
    write_gpt2_vocab(tmp_path / "gpt2", tok)
    loaded = load(tmp_path / "gpt2")
    assert torch.equal(logits(loaded.model), logits(model))
    text = "Tom went to the garden. 12 + 7 = 19"
    assert loaded.tokenizer.encode(text) == tok.encode(text) == bpe_tok.encode(text)
    assert loaded.tokenizer.eos_token_id == loaded.tokenizer.pad_token_id == tok.vocab_size - 1
    assert loaded.info["stage"] == "gpt2 folder"


@pytest.mark.parametrize("setting, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                            ("n_inner", 100), ("activation_function", "relu")])
def test_gpt2_settings_this_model_does_not_compute_are_refused(tmp_path, bpe_tok, setting, value):
    save_gpt2(tiny_gpt(bpe_tok.vocab_size), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {setting: value}))
    with pytest.raises(ValueError, match=setting):
        load(tmp_path)


def test_a_gpt2_folder_is_refused_as_a_reward_model_before_its_weights_are_read(tmp_path, bpe_tok):
    save_gpt2(tiny_gpt(bpe_tok.vocab_size), tmp_path)
    for f in tmp_path.iterdir():  # config.json alone: reading the weights would fail with another error
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(ValueError, match=r"is a language model \(stage 'gpt2 folder'\); expected a reward model"):
        load(tmp_path, expect="reward")
