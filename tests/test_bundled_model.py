"""The bundled dsv4-tiny meets the dsv4-tiny issue's bar from its FP8 + FP4 files, on CPU, on
the fixed held-out split `dsv4 eval` uses. A change to the model, the quantised formats, the
engine or the chat encoder that damages what the model learned shows up here."""

from dsv4.train.evaluate import BUNDLED, evaluate


def test_the_bundled_model_scores_what_the_readme_says():
    scores = evaluate(BUNDLED)  # 200 examples, greedy, fp32
    assert scores["num_examples"] == 200
    assert scores["arithmetic_accuracy"] >= 0.9  # README: 0.925 (86 of 93)
    assert scores["tool_call_accuracy"] >= 0.9  # README: 1.000
    assert scores["mtp_acceptance"] >= 0.5  # README: 0.999
