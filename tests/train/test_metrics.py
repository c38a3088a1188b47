import math

import pytest
from slmops_train.metrics import classification_metrics, generation_metrics, is_label_task, perplexity


def test_label_task_detection() -> None:
    assert is_label_task(["joy", "anger", "joy", "fear"])
    assert not is_label_task(['{"city": "Paris", "date": "May 1", "guests": 2}'])


def test_classification_metrics_are_case_and_space_insensitive() -> None:
    m = classification_metrics(["Joy ", "anger", "fear"], ["joy", "anger", "joy"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    # joy: P=1 R=0.5 F1=2/3; anger: F1=1  -> macro over reference labels = 5/6
    assert m["macro_f1"] == pytest.approx(5 / 6)


def test_generation_metrics() -> None:
    perfect = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["exact_match"] == 1.0
    partial = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert 0 < partial["rouge_l"] < 1 and partial["exact_match"] == 0.0


def test_perplexity() -> None:
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
