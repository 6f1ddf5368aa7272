"""The whole chain through the command lines, as a user runs it: pretrain -> SFT (LoRA, and all weights) -> reward
model -> PPO -> sample and chat on the SFT output and on the PPO policy. Each command opens the previous one's
output folder; PPO's KL to its reference is 0 at the first step (the reference is the SFT model, not the base)."""

import io
import json

import pytest
import torch

import peft
from minigpt import chat, checkpoint, sample, tasks
from minigpt import train as pretrain_cli
from peft import train as sft_cli
from rlhf import ppo as ppo_cli
from rlhf import reward_model as reward_cli

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "pretrain"
    pretrain_cli.main(["--out-dir", str(out), "--corpus-chars", "60000", "--vocab-size", "300", "--preset", "tiny",
                       "--block-size", "128", "--max-iters", "20", "--eval-interval", "20", "--eval-iters", "2",
                       "--batch-size", "8", *QUIET])
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_pretrain_sft_reward_ppo_sample_chat(pretrained, method, capsys):
    root = pretrained.parent / method
    sft_cli.main(["--method", method, "--base", str(pretrained), "--out-dir", str(root / "sft"), "--max-iters", "4",
                  "--batch-size", "4", "--eval-interval", "4", "--eval-examples", "4", *QUIET]
                 + (["--r", "2"] if method == "lora" else []))
    sft = checkpoint.load(root / "sft")
    assert sft.info["stage"] == "sft" and sft.info["template"] == tasks.TEMPLATE
    assert (getattr(sft.model, "peft_config", None) is not None) == (method == "lora")
    if method == "lora":  # the adapter alone, on the pretrained base
        assert (root / "sft" / "adapter.safetensors").is_file() and sft.info["base"] is not None

    reward_cli.main(["--sft", str(root / "sft"), "--out-dir", str(root / "reward"), "--n-pairs", "64",
                     "--max-iters", "2", "--batch-size", "4", "--eval-pairs", "8", "--n-normalize", "4",
                     "--max-new-tokens", "4", *QUIET])
    ppo_cli.main(["--sft", str(root / "sft"), "--reward", str(root / "reward"), "--out-dir", str(root / "ppo"),
                  "--steps", "2", "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6",
                  "--lr", "1e-2", "--no-progress"])
    rows = [json.loads(line) for line in (root / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0  # the first rollout is sampled from the reference itself
    assert rows[1]["kl"] != 0.0  # and the update moved the policy away from it
    policy = checkpoint.load(root / "ppo")
    assert policy.info["stage"] == "ppo" and policy.info["template"] == tasks.TEMPLATE
    if method == "lora":  # PPO trained the SFT adapter further: saved as an adapter on the same base
        assert (root / "ppo" / "adapter.safetensors").is_file()
        assert policy.info["base"]["path"] == sft.info["base"]["path"]
        lora_a = [n for n, _ in policy.model.named_parameters() if "lora_A" in n][0]
        assert not torch.equal(policy.model.state_dict()[lora_a], sft.model.state_dict()[lora_a])

    for model_dir in (root / "sft", root / "ppo"):
        capsys.readouterr()
        texts = sample.main(["--ckpt", str(model_dir), "--prompt", "What is 2 + 3?", "--num-samples", "2",
                             "--max-new-tokens", "5", "--device", "cpu"])
        assert all(t.startswith(tasks.format_prompt("What is 2 + 3?")) for t in texts)  # asked in the template
        answers = chat.main(["--model", str(model_dir), "--max-new-tokens", "5", "--device", "cpu"],
                            stdin=io.StringIO("What is 2 + 3?\nReverse the list.\n\n"), stdout=io.StringIO())
        assert len(answers) == 2
        alone = sample.sample(*checkpoint.load_model(model_dir), "What is 2 + 3?", num_samples=1, max_new_tokens=5,
                              temperature=0.0, template=tasks.TEMPLATE)[0]
        assert alone == tasks.format_prompt("What is 2 + 3?") + answers[0]  # chat answers what sample greedily does


def test_a_gpt2_folder_is_a_base_for_sft_and_its_adapter_reopens(pretrained, tmp_path):
    from test_checkpoint import write_gpt2_vocab

    from minigpt.pretrained import save_gpt2
    from minigpt.tokenizer import BPETokenizer

    model, tok = checkpoint.load_model(pretrained)
    gpt2_tok = BPETokenizer(tok.ranks, pad_token=False)  # GPT-2's layout has no pad token
    small = type(model)(model.config.replace(vocab_size=gpt2_tok.vocab_size))
    save_gpt2(small, tmp_path / "gpt2", eos_token_id=gpt2_tok.eos_token_id)
    write_gpt2_vocab(tmp_path / "gpt2", gpt2_tok)
    sft_cli.main(["--method", "lora", "--base", str(tmp_path / "gpt2"), "--out-dir", str(tmp_path / "sft"),
                  "--max-iters", "2", "--batch-size", "2", "--eval-interval", "2", "--eval-examples", "2", *QUIET])
    loaded = checkpoint.load(tmp_path / "sft")
    assert loaded.info["base"]["path"] == str((tmp_path / "gpt2").resolve())
    assert loaded.tokenizer.to_dict() == gpt2_tok.to_dict() and isinstance(loaded.model.peft_config, peft.LoraConfig)


def test_options_of_another_method_and_unknown_values_are_refused(pretrained, capsys):
    with pytest.raises(SystemExit):
        sft_cli.main(["--method", "lora", "--num-virtual-tokens", "4", "--base", str(pretrained)])
    assert "lora has no option 'num_virtual_tokens'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft_cli.main(["--method", "p_tuning", "--encoder-reparameterization-type", "mlp", "--r", "4"])
    assert "p_tuning has no option 'r'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a reward model"):
        ppo_cli.main(["--sft", str(pretrained), "--reward", str(pretrained), "--steps", "1", "--no-progress"])
    from rlhf import dpo as dpo_cli
    from rlhf import grpo as grpo_cli

    for cli in (ppo_cli, grpo_cli, dpo_cli):  # a method option without --peft METHOD would be silently unused
        with pytest.raises(SystemExit):
            cli.main(["--sft", str(pretrained), "--r", "4", "--no-progress"])
        assert "options ['r'] need --peft METHOD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grpo_cli.main(["--sft", str(pretrained), "--peft", "lora", "--num-virtual-tokens", "4"])
    assert "lora has no option 'num_virtual_tokens'" in capsys.readouterr().err
