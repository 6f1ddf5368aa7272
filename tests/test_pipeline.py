"""The four stages end to end at toy sizes: every stage runs, saves, resumes, and the report is written."""

import json

from rlhf.pipeline import Sizes, main

TOY = Sizes(corpus_chars=60_000, pretrain_iters=20, n_layer=1, n_embd=32, sft_iters=8, reward_pairs=200,
            reward_iters=6, ppo_steps=2, ppo_batch=8, eval_prompts=8)


def test_pipeline_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "pipe"
    results = main(["--out-dir", str(out), "--no-progress"], sizes=TOY)
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (out / stage / "stage.json").is_file()
        assert results[stage]["params"] > 0 and results[stage]["wall_s"] >= 0
    assert {"pretrain/best.pt", "pretrain/model.json", "sft/model.json", "reward/model.json", "ppo/model.json",
            "ppo/ppo.png", "report.md"} <= {
        str(p.relative_to(out)) for p in out.rglob("*")}
    rows = [json.loads(line) for line in (out / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"score", "kl", "true_score", "entropy", "clipfrac", "explained_variance"} <= set(rows[0])
    ppo = json.loads((out / "ppo" / "model.json").read_text())["settings"]["ppo"]  # what the PPO run was given
    assert (ppo["ppo_epochs"], ppo["lr"], ppo["vf_lr"], ppo["steps"], ppo["batch_size"]) == (2, 2e-5, 1e-3, 2, 8)
    assert "| pretrain |" in (out / "report.md").read_text()
    # the SFT data carries remarks after a share of the answers; the reward model is also scored on the probes
    sft_train = [json.loads(line) for line in (out / "data" / "sft_train.jsonl").read_text().splitlines()]
    assert abs(sum(ex.get("remark", False) for ex in sft_train) / len(sft_train) - TOY.remark_share) < 0.05
    assert set(results["reward"]["probe_accuracy"]) == {"near_miss", "list_edit"}
    # a second run finds every stage done and only rewrites the report
    capsys.readouterr()
    again = main(["--out-dir", str(out), "--no-progress"], sizes=TOY)
    assert capsys.readouterr().out.count("done earlier, skipping") == 4
    assert again["ppo"]["after"] == results["ppo"]["after"]
    # a run with other sizes or options refuses the stage they change instead of reusing it
    import dataclasses

    import pytest

    with pytest.raises(ValueError, match=r"pretrain was made with other settings: pretrain_iters=20 \(now 21\)"):
        main(["--out-dir", str(out), "--no-progress"], sizes=dataclasses.replace(TOY, pretrain_iters=21))
    with pytest.raises(ValueError, match=r"ppo was made with other settings: reward='reward_model' \(now 'checker'\)"):
        main(["--out-dir", str(out), "--no-progress", "--reward-fn", "checker"], sizes=TOY)
    # --redo reward redoes the reward model and PPO, made from it, and leaves the stages before it alone
    capsys.readouterr()
    redone = main(["--out-dir", str(out), "--no-progress", "--redo", "reward"], sizes=TOY)
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipping") == 2 and "== ppo: made from an earlier run of reward; redoing" in printed
    assert redone["sft"]["run_id"] == results["sft"]["run_id"] != redone["reward"]["run_id"] != results["reward"][
        "run_id"]
    ppo_json = json.loads((out / "ppo" / "stage.json").read_text())
    assert ppo_json["made_from"] == {"sft": results["sft"]["run_id"], "reward": redone["reward"]["run_id"]}
    with pytest.raises(ValueError, match="--redo ppo: that stage is not among --stages pretrain,sft"):
        main(["--out-dir", str(out), "--no-progress", "--redo", "ppo", "--stages", "pretrain,sft"], sizes=TOY)
    # --reward-hacking's beta = 0 run is made from the same stages as PPO, and --redo ppo redoes both
    main(["--out-dir", str(out), "--no-progress", "--reward-hacking"], sizes=TOY)
    beta0 = json.loads((out / "ppo_beta0" / "stage.json").read_text())
    assert beta0["made_from"] == ppo_json["made_from"]
    capsys.readouterr()
    main(["--out-dir", str(out), "--no-progress", "--reward-hacking", "--redo", "ppo"], sizes=TOY)
    assert capsys.readouterr().out.count("done earlier, skipping") == 3  # pretrain, sft, reward
    assert json.loads((out / "ppo_beta0" / "stage.json").read_text())["run_id"] != beta0["run_id"]


def test_an_interrupted_pretraining_stage_continues_with_the_gelu_it_was_built_with(tmp_path, monkeypatch):
    import dataclasses
    import functools

    from minigpt.checkpoint import load_checkpoint
    from rlhf import pipeline

    # a run of an older version: pretraining built GPT-2's tanh GELU; it stopped with a checkpoint at iteration 9
    monkeypatch.setattr(pipeline, "PretrainConfig", functools.partial(pipeline.PretrainConfig, activation="gelu_tanh"))
    pipeline.stage_pretrain(tmp_path, dataclasses.replace(TOY, pretrain_iters=10), False,
                            {"resume": False, "overwrite": True})
    monkeypatch.undo()
    pipeline.run_stage(tmp_path, "pretrain", lambda mode: pipeline.stage_pretrain(tmp_path, TOY, False, mode))
    ckpt = load_checkpoint(tmp_path / "pretrain" / "ckpt.pt")
    assert ckpt["iter"] == TOY.pretrain_iters - 1 and ckpt["model_config"]["activation"] == "gelu_tanh"


def test_the_pretraining_stage_trains_and_evaluates_at_the_sizes_it_is_given(tmp_path, monkeypatch):
    import dataclasses

    from rlhf import pipeline

    seen = {}

    def fake_pretrain(pcfg, cfg):
        seen["cfg"] = cfg
        return {"params": 1, "val_loss": 0.0}

    monkeypatch.setattr(pipeline, "pretrain", fake_pretrain)
    for sizes in (Sizes(), pipeline.FAST, dataclasses.replace(pipeline.FAST, pretrain_eval_windows=96)):
        pipeline.stage_pretrain(tmp_path, sizes, False, {"resume": False, "overwrite": True})
        cfg = seen["cfg"]
        assert (cfg.batch_size, cfg.max_iters, cfg.lr) == (sizes.pretrain_batch, sizes.pretrain_iters,
                                                           sizes.pretrain_lr)
        # the evaluation reads the same windows whatever the batch: eval_iters batches of batch_size windows
        assert cfg.batch_size * cfg.eval_iters == sizes.pretrain_eval_windows
        assert cfg.min_lr == sizes.pretrain_lr / 10
    assert Sizes().pretrain_eval_windows == 320  # the demo's evaluation, as before batches of 16


def test_a_finished_stage_made_with_other_settings_is_refused_not_reused(tmp_path, capsys):
    import dataclasses

    import pytest

    from rlhf import pipeline

    calls = []

    def stage(mode):
        calls.append(mode)
        return {"params": 1}

    settings = pipeline.stage_settings(TOY, "sft", method="full")
    assert settings == {"sft_iters": TOY.sft_iters, "remark_share": TOY.remark_share,
                        "eval_prompts": TOY.eval_prompts, "method": "full"}
    pipeline.run_stage(tmp_path, "sft", stage, settings=settings)
    assert json.loads((tmp_path / "sft" / "stage.json").read_text())["settings"] == settings
    pipeline.run_stage(tmp_path, "sft", stage, settings=settings)  # the same settings: skipped
    assert len(calls) == 1
    # sizes another stage reads do not matter to this one; its own do, and each difference is named
    other = pipeline.stage_settings(dataclasses.replace(TOY, ppo_steps=99, n_embd=8), "sft", method="full")
    pipeline.run_stage(tmp_path, "sft", stage, settings=other)
    assert len(calls) == 1
    changed = pipeline.stage_settings(dataclasses.replace(TOY, sft_iters=99), "sft", method="lora")
    with pytest.raises(ValueError, match=r"sft_iters=8 \(now 99\), method='full' \(now 'lora'\); redo it with "
                                         r"--redo sft \(or every stage with --force\)"):
        pipeline.run_stage(tmp_path, "sft", stage, settings=changed)
    pipeline.run_stage(tmp_path, "sft", stage, force=True, settings=changed)
    assert len(calls) == 2
    # a stage.json of an older version, which recorded no settings, is refused too
    (tmp_path / "sft" / "stage.json").write_text(json.dumps({"params": 1}))
    with pytest.raises(ValueError, match="older version"):
        pipeline.run_stage(tmp_path, "sft", stage, settings=settings)


def test_each_stage_records_the_sizes_it_reads():
    from rlhf import pipeline

    assert set(pipeline.stage_settings(TOY, "pretrain")) == {
        "corpus_chars", "n_layer", "n_embd", "pretrain_iters", "pretrain_batch", "pretrain_lr", "pretrain_eval_windows"}
    assert set(pipeline.stage_settings(TOY, "reward")) == {"reward_pairs", "reward_iters", "eval_prompts"}
    assert set(pipeline.stage_settings(TOY, "ppo", beta=1.0, reward="checker")) == {
        "ppo_steps", "ppo_batch", "ppo_vf_lr", "ppo_epochs", "ppo_lr", "eval_prompts", "eval_samples", "beta", "reward"}


def test_a_stage_made_from_another_run_of_the_stage_before_it_is_redone(tmp_path, capsys):
    import pytest

    from rlhf import pipeline

    calls = []

    def stage(mode):
        assert not (tmp_path / "reward" / "stage.json").exists()  # removed first: a crash here leaves no marker
        calls.append(mode)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"params": 1}

    settings = pipeline.stage_settings(TOY, "reward")
    first = pipeline.run_stage(tmp_path, "reward", stage, settings=settings, made_from={"sft": "a"})
    recorded = json.loads((tmp_path / "reward" / "stage.json").read_text())
    assert recorded["made_from"] == {"sft": "a"} and recorded["run_id"] == first["run_id"] and "skipped" not in first
    again = pipeline.run_stage(tmp_path, "reward", stage, settings=settings, made_from={"sft": "a"})
    assert len(calls) == 1 and again["skipped"] and again["run_id"] == first["run_id"]
    # the SFT stage was redone since: the reward model is redone too, afresh, even with other settings
    (tmp_path / "reward" / "ckpt.pt").write_bytes(b"")
    other = pipeline.stage_settings(TOY, "reward") | {"reward_iters": 99}
    redone = pipeline.run_stage(tmp_path, "reward", stage, settings=other, made_from={"sft": "b"})
    assert calls[1] == {"resume": False, "overwrite": True} and redone["run_id"] != first["run_id"]
    assert "== reward: made from an earlier run of sft; redoing it" in capsys.readouterr().out
    # a redo interrupted before it finished leaves no stage.json, so the next run does not take it for done
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage(tmp_path, "reward", stage, settings=settings, made_from={"sft": "c"})
    assert not (tmp_path / "reward" / "stage.json").exists()


def test_what_each_stage_is_made_from_and_which_of_those_changed():
    from rlhf import pipeline

    results = {"pretrain": {"run_id": "p", "skipped": True}, "sft": {"run_id": "s"}, "reward": {"skipped": True}}
    assert pipeline.made_from(results, "pretrain") is None
    assert pipeline.made_from(results, "sft") == {"pretrain": "p"}
    assert pipeline.made_from(results, "ppo") == {"sft": "s"}  # a reward stage of an older version recorded no id
    assert pipeline.made_from({"pretrain": {}}, "sft") is None
    assert pipeline.changed_inputs({"sft": "s", "reward": "r"}, {"sft": "s", "reward": "q"}) == ["reward"]
    assert pipeline.changed_inputs(None, {"sft": "s"}) == ["sft"] and pipeline.changed_inputs({"sft": "s"}, None) == [
        "sft"]
    assert pipeline.changed_inputs(None, None) == [] and pipeline.changed_inputs({"sft": "s"}, {"sft": "s"}) == []


def test_an_interrupted_stage_continues_only_on_the_inputs_and_settings_it_began_with(tmp_path, capsys):
    import pytest

    from rlhf import pipeline

    folder, calls = tmp_path / "reward", []

    class Stopped(Exception):
        pass

    def interrupted_stage(mode):  # leaves a checkpoint, then stops as Ctrl-C would
        calls.append(mode)
        (folder / "ckpt.pt").write_bytes(b"")
        raise Stopped

    settings = pipeline.stage_settings(TOY, "reward")
    resume, afresh = {"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}

    def run(made_from, stage_settings=settings):
        with pytest.raises(Stopped):
            pipeline.run_stage(tmp_path, "reward", interrupted_stage, settings=stage_settings, made_from=made_from)
        return calls[-1]

    assert run({"sft": "a"}) == afresh and not (folder / "stage.json").exists()
    assert run({"sft": "a"}) == resume  # begun on the same SFT run: it continues
    assert run({"sft": "b"}) == afresh  # the SFT stage was redone since: its checkpoint is of the old SFT model
    assert "== reward: made from an earlier run of sft; redoing it afresh" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"reward_iters=6 \(now 7\); redo it with --redo reward"):
        pipeline.run_stage(tmp_path, "reward", interrupted_stage, settings=settings | {"reward_iters": 7},
                           made_from={"sft": "b"})
    # a run of an older version recorded neither: it continues, unless the stage before it has been redone since
    (folder / "started.json").unlink()
    assert run(None) == resume
    (folder / "started.json").unlink()
    assert run({"sft": "c"}) == afresh


def test_a_second_pipeline_on_the_same_folder_is_refused_before_it_touches_a_stage(tmp_path, monkeypatch):
    """While one pipeline holds --out-dir (its run.lock names a live process), another is refused before any stage's
    stage.json is removed; the folder is free again once the lock's process is gone or the holder has finished."""
    import os

    import pytest

    from minigpt.runs import hold
    from rlhf import pipeline

    (tmp_path / "pretrain").mkdir()
    marker = tmp_path / "pretrain" / "stage.json"
    marker.write_text(json.dumps({"settings": {}, "run_id": "a"}))
    (tmp_path / "run.lock").write_text(str(os.getppid()))  # a live process that is not this one
    ran = []
    monkeypatch.setattr(pipeline, "stage_pretrain",
                        lambda *a: ran.append((tmp_path / "run.lock").read_text()) or {"params": 1})
    with pytest.raises(RuntimeError, match=f"another run \\(process {os.getppid()}\\) is writing to"):
        main(["--out-dir", str(tmp_path), "--stages", "pretrain", "--redo", "pretrain", "--no-progress"])
    assert marker.is_file() and not ran
    (tmp_path / "run.lock").unlink()
    main(["--out-dir", str(tmp_path), "--stages", "pretrain", "--redo", "pretrain", "--no-progress"])
    assert ran == [str(os.getpid())] and not (tmp_path / "run.lock").exists()  # held while the stage ran, not after
    with hold(tmp_path):
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "run.lock").exists()


def test_the_ppo_stage_takes_its_sizes_passes_and_rate(tmp_path, monkeypatch):
    """stage_ppo hands the sizes' ppo_epochs and ppo_lr (here not the defaults) to PPO, not constants of its own."""
    import dataclasses

    import pytest

    from rlhf import pipeline

    seen = {}

    def fake_run_ppo(run, cfg, reward):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before anything is read or trained

    monkeypatch.setattr(pipeline, "run_ppo", fake_run_ppo)
    sizes = dataclasses.replace(TOY, ppo_epochs=3, ppo_lr=3e-5, ppo_vf_lr=2e-3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.stage_ppo(tmp_path, sizes, False, 0.5, "ppo", "reward_model", {"resume": False, "overwrite": True})
    cfg = seen["cfg"]
    assert (cfg.ppo_epochs, cfg.lr, cfg.vf_lr, cfg.beta, cfg.steps, cfg.batch_size) == (3, 3e-5, 2e-3, 0.5, 2, 8)


def test_bad_ppo_options_are_refused_before_any_stage_runs(tmp_path):
    import pytest

    out = tmp_path / "pipe"
    with pytest.raises(ValueError, match="ppo_epochs must be >= 1, got 0"):
        main(["--out-dir", str(out), "--no-progress", "--ppo-epochs", "0"], sizes=TOY)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -1.0"):
        main(["--out-dir", str(out), "--no-progress", "--ppo-lr", "-1"], sizes=TOY)
    assert not out.exists()  # nothing trained, nothing written
