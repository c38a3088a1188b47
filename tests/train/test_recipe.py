"""Integration tests of the train stage on the tiny Llama: real Trainer, real PEFT, real files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from slmops_train.config import build_config
from slmops_train.recipe import load_model, train

from slmops.errors import SlmopsUsageError
from tests.conftest import REPO


def test_training_lowers_loss_and_writes_a_complete_run(base_args) -> None:
    cfg = build_config({**base_args, "max_steps": 16, "learning_rate": 5e-3, "target_modules": ["all-linear"],
                        "eval_steps": 8, "lora_r": 8})
    result = train(cfg)
    run = result.run_dir
    record = json.loads((run / "run.json").read_text())
    losses = [h["loss"] for h in record["metrics"]["train_log"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    evals = record["metrics"]["evals"]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_macro_f1"):
        assert key in record["metrics"]["final"]
    assert record["task"]["type"] == "classification"
    assert len(record["base_model"]["sha256"]) == 64
    assert record["dataset"]["sha256"] and record["dataset"]["train_rows"] == 20
    assert record["performance"]["tokens_per_s"] > 0 and record["performance"]["steps"] == 16
    assert {"torch", "transformers", "peft"} <= set(record["versions"])
    assert record["config"]["lora_r"] == 8
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "slmops_adapter.json").read_text())["base_model_sha256"] == record["base_model"]["sha256"]
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.parent.glob(".*partial"))  # the work dir is gone
    # what the build stage validates with, as files: the eval rows rendered as training rendered them
    assert record["schema_version"] == 2
    section = record["validation"]
    assert section["chat"] is False and list(section["splits"]) == ["eval"]
    rows = [json.loads(line) for line in (run / section["splits"]["eval"]["file"]).read_text().splitlines()]
    assert len(rows) == section["splits"]["eval"]["rows"] == 10
    assert rows[0]["prompt"].startswith("Tone of: ") and rows[0]["text"] == rows[0]["prompt"] + rows[0]["reference"]


def test_adapter_loads_back_with_peft(base_args, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(build_config({**base_args, "eval_split": "none"}))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert model.peft_config["default"].r == 8


def test_existing_output_needs_overwrite_and_stays_untouched(base_args) -> None:
    out = Path(base_args["output_path"])
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlmopsUsageError) as err:
        train(build_config(base_args))
    assert "--overwrite" in err.value.message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    train(build_config({**base_args, "overwrite": True, "eval_split": "none"}))
    assert (out / "adapter").is_dir() and not (out / "keep.txt").exists()


def test_unknown_target_module_is_refused(base_args) -> None:
    with pytest.raises(SlmopsUsageError) as err:
        train(build_config({**base_args, "target_modules": ["q_proj", "qkv_proj"]}))
    assert err.value.option == "--target_modules" and "qkv_proj" in err.value.message and "v_proj" in err.value.message
    assert not Path(base_args["output_path"]).exists()


def test_early_stopping_keeps_the_best_checkpoint(base_args) -> None:
    # A rate this high diverges after the first evals, so patience 1 must stop early.
    cfg = build_config({**base_args, "max_steps": 40, "learning_rate": 0.5, "eval_steps": 2,
                        "early_stopping_patience": 1, "target_modules": ["all-linear"]})
    result = train(cfg)
    record = result.record
    assert record["performance"]["steps"] < 40
    best = record["metrics"]["best_checkpoint_metric"]
    assert best == min(e["eval_loss"] for e in record["metrics"]["evals"])
    assert record["metrics"]["final"]["eval_loss"] == pytest.approx(best, rel=1e-4)
    # run.json reuses the best eval instead of evaluating again: the saved adapter must really be that checkpoint
    assert _eval_loss_of_saved_adapter(cfg, result.adapter_dir) == pytest.approx(best, rel=1e-4)


def _eval_loss_of_saved_adapter(cfg, adapter_dir: Path) -> float:
    """eval_loss of the adapter on disk, through a plain transformers Trainer (not ours)."""
    from peft import PeftModel
    from slmops_train.data import Collator, prepare_data
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    data = prepare_data(cfg, tok)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path), adapter_dir)
    args = TrainingArguments(output_dir=str(adapter_dir.parent / "plain-eval"), per_device_eval_batch_size=cfg.per_device_eval_batch_size,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data.eval, data_collator=Collator(tok.pad_token_id))
    return float(trainer.evaluate()["eval_loss"])


def test_test_split_is_scored_once_after_selection(base_args, tmp_path) -> None:
    """Test rows reach neither training nor checkpoint selection; run.json reports train/eval/test apart."""
    from tests.conftest import EXAMPLES, write_jsonl

    test_file = write_jsonl(tmp_path / "test.jsonl", [json.loads(x) for x in (EXAMPLES / "tone" / "test.jsonl").read_text().splitlines()[:6]])
    cfg = build_config({**base_args, "data_files": [*base_args["data_files"], f"test={test_file}"], "test_split": "test",
                        "max_steps": 6, "eval_steps": 2, "metric_for_best_model": "eval_loss"})
    record = train(cfg).record
    figures = record["metrics"]["figures"]
    assert list(figures) == ["train", "eval", "test"]
    assert (figures["train"]["rows"], figures["eval"]["rows"], figures["test"]["rows"]) == (4, 10, 6)
    assert {"loss", "accuracy", "macro_f1"} <= set(figures["test"]) and {"loss", "accuracy"} <= set(figures["train"])
    # every eval during training was on the eval split only; selection used those
    assert len(record["metrics"]["evals"]) == 3 and all(not any(k.startswith("test_") for k in e) for e in record["metrics"]["evals"])
    assert figures["eval"]["loss"] == record["metrics"]["best_checkpoint_metric"]
    assert figures["eval"]["step"] in {e["step"] for e in record["metrics"]["evals"]}
    assert figures["test"]["loss"] != figures["eval"]["loss"]
    assert record["dataset"]["test_rows"] == 6 and record["performance"]["final_figures_s"] > 0
    # tokens_seen counts training batches only: the same run without any evaluation fed the same tokens
    quiet = train(build_config({**cfg.model_dump(), "eval_split": "none", "test_split": None, "eval_generate_limit": 0,
                                "eval_steps": None, "metric_for_best_model": "eval_loss", "overwrite": True,
                                "output_path": str(tmp_path / "quiet")})).record
    assert quiet["performance"]["tokens_seen"] == record["performance"]["tokens_seen"] > 0
    with pytest.raises(SlmopsUsageError) as err:
        train(build_config({**base_args, "test_split": "eval", "overwrite": True}))
    assert err.value.option == "--test_split" and "also the --eval_split" in err.value.message


def test_resume_continues_from_the_last_checkpoint(base_args) -> None:
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    import slmops_train.recipe as recipe

    cfg = build_config({**base_args, "max_steps": 8, "save_steps": 2, "eval_split": "none"})
    original = recipe._progress_callback
    recipe._progress_callback = lambda: (lambda title: Interrupt())  # inject the interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train(build_config({**cfg.model_dump(), "progress": True}))
    finally:
        recipe._progress_callback = original
    out = Path(base_args["output_path"])
    assert not out.exists()  # nothing half-written at the output path
    checkpoint = out.parent / ".run.partial" / "checkpoints" / "checkpoint-4"
    assert checkpoint.is_dir()
    # a run without --resume must not delete the unfinished run's checkpoints
    with pytest.raises(SlmopsUsageError) as err:
        train(cfg)
    assert err.value.option == "--resume" and ".run.partial" in err.value.message and "--overwrite" in err.value.message
    assert checkpoint.is_dir() and not out.exists()
    record = train(build_config({**cfg.model_dump(), "resume": True})).record
    assert record["performance"]["resumed_from"] == "checkpoint-4"
    assert record["performance"]["steps"] == 8
    assert len(record["metrics"]["train_log"]) == 8
    # --overwrite deletes them and starts again
    recipe._progress_callback = lambda: (lambda title: Interrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            train(build_config({**cfg.model_dump(), "progress": True, "overwrite": True}))
    finally:
        recipe._progress_callback = original
    assert checkpoint.is_dir()
    record = train(build_config({**cfg.model_dump(), "overwrite": True})).record
    assert record["performance"]["resumed_from"] is None and record["performance"]["steps"] == 8
    assert not checkpoint.exists()


def test_custom_loss_is_used(base_args) -> None:
    from tests.train import custom_loss

    custom_loss.CALLS["n"] = 0
    record = train(build_config({**base_args, "loss_fn": "tests.train.custom_loss:ScaledCrossEntropy",
                                 "eval_split": "none"})).record
    assert custom_loss.CALLS["n"] >= 4
    # twice the plain token loss of a ~400-token vocab (ln 400 ~ 6)
    assert record["metrics"]["train_log"][0]["loss"] > 10
    with pytest.raises(SlmopsUsageError) as err:
        train(build_config({**base_args, "loss_fn": "tests.train.custom_loss:Nope", "overwrite": True}))
    assert err.value.option == "--loss_fn"


def test_packing_trains(base_args) -> None:
    record = train(build_config({**base_args, "packing": True, "max_seq_len": 128, "eval_split": "none"})).record
    assert record["dataset"]["packed_rows"] < 20
    assert record["performance"]["steps"] == 4


def test_qlora_lowers_loss_with_nonzero_lora_gradients(base_args, tiny_data) -> None:
    """On CPU, bitsandbytes 4-bit layers silently give no gradients in eval mode: check both."""
    import torch
    from slmops_train.data import Collator, prepare_data
    from transformers import AutoTokenizer

    cfg = build_config({**base_args, "method": "qlora", "target_modules": ["all-linear"], "lora_r": 8})
    tok = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    model = load_model(cfg, cfg.model_name_or_path)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    batch = Collator(tok.pad_token_id)([prepare_data(cfg, tok).train[i] for i in range(8)])
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        optim.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert losses[-1] < losses[0] - 0.1, losses


def test_qlora_through_the_trainer(base_args) -> None:
    record = train(build_config({**base_args, "method": "qlora", "max_steps": 10, "learning_rate": 5e-3,
                                 "target_modules": ["all-linear"], "eval_split": "none"})).record
    losses = [h["loss"] for h in record["metrics"]["train_log"]]
    assert losses[-1] < losses[0], losses


def test_hyperparameter_search_keeps_the_best_trial(base_args, tmp_path) -> None:
    import yaml
    from slmops_train.search import run_search

    (tmp_path / "search.yaml").write_text(yaml.safe_dump({
        "base": {k: v for k, v in base_args.items() if k != "output_path"},
        "n_trials": 3, "sampler": "random", "metric": "eval_loss", "seed": 1,
        "params": {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                   "lora_r": {"type": "int", "low": 2, "high": 8},
                   "per_device_train_batch_size": {"type": "choice", "values": [2, 4]}},
    }))
    out = tmp_path / "search-out"
    # an unfinished search's trials are not deleted without --overwrite
    earlier = tmp_path / ".search-out.search" / "trial_0" / "run.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    with pytest.raises(SlmopsUsageError) as err:
        run_search(tmp_path / "search.yaml", {"output_path": str(out)})
    assert err.value.option == "--overwrite" and ".search-out.search" in err.value.message and "trial_0" in err.value.message
    assert earlier.read_text() == "{}" and not out.exists()
    summary = run_search(tmp_path / "search.yaml", {"output_path": str(out), "overwrite": True})
    assert not earlier.parent.parent.exists()
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials["trials"]) == 3
    assert summary["best_value"] == min(t["eval_loss"] for t in trials["trials"])
    assert (out / "trials.csv").read_text().count("\n") == 4
    assert (out / "adapter" / "adapter_config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["search"]["best_trial"] == summary["best_trial"]
    assert record["config"]["lora_r"] == summary["best_params"]["lora_r"]


@pytest.mark.ddp
def test_two_process_ddp_on_cpu(base_args, tmp_path) -> None:
    import yaml

    cfg = {**base_args, "eval_split": "none", "max_steps": 3, "per_device_train_batch_size": 2}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Own process group, so a hang kills the workers too, not just torchrun.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "slmops.cli", "train", "-c", str(tmp_path / "ddp.yaml")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    record = json.loads((Path(base_args["output_path"]) / "run.json").read_text())
    assert record["performance"]["world_size"] == 2 and record["performance"]["steps"] == 3
