from pathlib import Path

import pytest
import yaml
from slmops_train.config import build_config, configs_from_yaml

from slmops.errors import SlmopsUsageError


def test_split_slices_are_accepted_and_bad_slices_name_the_option() -> None:
    cfg = build_config({"data_files": ["x.jsonl"], "train_split": "train[:4096]", "eval_split": "train[4096:4224]"})
    assert cfg.train_split == "train[:4096]"
    assert build_config({"data_files": ["x.jsonl"], "train_split": "train[:90%]"}).train_split == "train[:90%]"
    with pytest.raises(SlmopsUsageError) as err:
        build_config({"data_files": ["x.jsonl"], "train_split": "train[1:2:3]"})
    assert err.value.option == "--train_split"
    assert "slice" in err.value.message


def test_missing_data_source_and_unknown_option_are_usage_errors() -> None:
    with pytest.raises(SlmopsUsageError, match="data_files"):
        build_config({})
    with pytest.raises(SlmopsUsageError) as err:
        build_config({"data_files": ["x.jsonl"], "lora_rank": 4})
    assert err.value.option == "--lora_rank"


def test_comma_separated_lists_are_split() -> None:
    cfg = build_config({"data_files": "a.jsonl,eval=b.jsonl", "target_modules": "q_proj,v_proj", "report_to": "none"})
    assert cfg.data_files == ["a.jsonl", "eval=b.jsonl"]
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.report_to == []


def test_yaml_with_several_adapters_gives_one_config_each(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"x": "1", "y": "2"}\n')
    (tmp_path / "b.jsonl").write_text('{"x": "1", "y": "2"}\n')
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "lora_r": 4, "max_steps": 3,
        "adapters": {"first": {"data_files": ["a.jsonl"]}, "second": {"data_files": ["eval=b.jsonl", "a.jsonl"], "lora_r": 16}},
    }))
    first, second = configs_from_yaml(tmp_path / "cfg.yaml", {"max_steps": 7, "output_path": str(tmp_path / "out")})
    assert (first.name, first.lora_r, first.max_steps) == ("first", 4, 7)
    assert (second.name, second.lora_r) == ("second", 16)
    assert first.data_files == [str(tmp_path / "a.jsonl")]  # relative to the YAML file
    assert second.data_files == [f"eval={tmp_path / 'b.jsonl'}", str(tmp_path / "a.jsonl")]
    assert Path(first.output_path or "") == tmp_path / "out" / "first"


def test_run_dir_defaults_to_runs_and_data_stem() -> None:
    cfg = build_config({"data_files": ["data/phrases.jsonl"]})
    assert cfg.run_dir() == Path("runs/phrases")
