from __future__ import annotations

import json

import pytest

from dsv4.train import data


def test_corpus_is_deterministic_in_seed():
    a = [e.messages for e in data.generate_examples(50, seed=3)]
    b = [e.messages for e in data.generate_examples(50, seed=3)]
    c = [e.messages for e in data.generate_examples(50, seed=4)]
    assert a == b
    assert a != c


def test_eval_split_never_appears_in_training():
    train_specs = {e.spec for e in data.generate_examples(5000, seed=0)}
    eval_specs = {e.spec for e in data.eval_examples(300)}
    assert eval_specs, "evaluation split is empty"
    assert not train_specs & eval_specs
    assert all(data.is_held_out(s) for s in eval_specs)


def test_every_family_and_mode_is_present():
    examples = list(data.generate_examples(400, seed=1))
    seen = {(e.family, e.thinking_mode) for e in examples}
    for family in data.FAMILY_WEIGHTS:
        for mode in data.THINKING_MODES:
            assert (family, mode) in seen


def test_arithmetic_answers_are_right_and_reasoning_only_in_thinking_mode():
    for e in data.generate_examples(300, seed=2, families={"arithmetic": 1.0}):
        _, op, a, b = e.spec
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        reply = e.messages[-1]
        assert e.expected["answer"] == expected
        assert reply["content"] == str(expected)
        assert ("reasoning_content" in reply) == (e.thinking_mode == "thinking")
        if e.thinking_mode == "thinking":
            assert reply["reasoning_content"].endswith(f"= {expected}.")


def test_training_practises_subtraction_more_than_the_evaluation_asks_it():
    def share_of_subtraction(examples):
        ops = [e.spec[1] for e in examples if e.family == "arithmetic"]
        return ops.count("-") / len(ops)

    trained = share_of_subtraction(data.generate_examples(3000, seed=0,
                                                          families={"arithmetic": 1.0}))
    assert abs(trained - data.TRAINING_OP_WEIGHTS["-"]) < 0.03
    assert abs(share_of_subtraction(data.eval_examples(1000)) - 1 / 3) < 0.06


def test_bare_products_train_over_wider_operands_than_the_evaluation_asks():
    def first_operands(examples, mode):
        return {e.spec[2] for e in examples
                if e.family == "arithmetic" and e.spec[1] == "*" and e.thinking_mode == mode}

    trained = list(data.generate_examples(4000, seed=0, families={"arithmetic": 1.0}))
    asked = data.eval_examples(2000)
    assert max(first_operands(trained, "chat")) > 90
    assert max(first_operands(trained, "thinking")) < 50  # reasoning keeps the eval's range
    assert max(first_operands(asked, "chat")) < 50


def test_tool_conversations_are_consistent():
    kinds_of_values, tool_counts = set(), set()
    for e in data.generate_examples(300, seed=5, families={"tool": 1.0}):
        system, user, call, result, final = e.messages
        offered = [t["function"]["name"] for t in system["tools"]]
        assert e.expected["tool"] in offered and set(offered) <= set(data.TOOL_NAMES)
        assert len(set(offered)) == len(offered) and system["tools"] == e.tools
        tool_counts.add(len(offered))
        tool_call = call["tool_calls"][0]
        assert tool_call["function"]["name"] == e.expected["tool"]
        arguments = json.loads(tool_call["function"]["arguments"])
        assert arguments == e.expected["arguments"]
        assert result["tool_call_id"] == tool_call["id"]
        json.loads(result["content"])
        assert final["content"] == e.expected["final"]
        kinds_of_values |= {type(v).__name__ for v in arguments.values()}
    # DSML needs both string="true" and string="false" parameters
    assert {"str", "int"} <= kinds_of_values
    assert tool_counts == {1, 2, 3, 4}  # from the needed tool alone to every tool


@pytest.mark.parametrize(("a", "b", "steps"), [
    (42, 38, "2 < 8, borrow: 12 - 8 = 4, write 4; 4 - 1 = 3, 3 - 3 = 0, write 0"),
    (100, 1, "0 < 1, borrow: 10 - 1 = 9, write 9; 0 - 1 = -1, -1 < 0, borrow: 9 - 0 = 9, "
              "write 9; 1 - 1 = 0, 0 - 0 = 0, write 0"),
    (35, 47, "Subtract 35 from 47 column by column: 7 - 5 = 2"),  # negative: the other way
])
def test_subtraction_reasoning_borrows_column_by_column(a, b, steps):
    text = data._digits_reasoning_sub(a, b)
    assert text.endswith(f"{a} - {b} = {a - b}.")
    assert steps in text


@pytest.mark.parametrize(("a", "b", "steps"), [
    (38, 4, "8 + 4 = 12, write 2; 3 + 0 = 3, 3 + 1 = 4, write 4"),  # the carry: its own fact
    (99, 99, "9 + 9 = 18, 18 + 1 = 19, write 9; carry 1"),
])
def test_addition_reasoning_adds_a_carry_in_its_own_step(a, b, steps):
    text = data._digits_reasoning_add(a, b)
    assert steps in text and text.endswith(f"So {a} + {b} = {a + b}.")


def test_multiplication_reasoning_adds_the_partial_products_column_by_column():
    text = data._digits_reasoning_mul(37, 3)
    assert "30 * 3 = 90; 7 * 3 = 21. Add 90 and 21 column by column: 0 + 1 = 1" in text
    assert text.endswith("So 37 * 3 = 111.")


def test_calculator_rejects_anything_but_arithmetic():
    assert data._evaluate_expression("(2 + 3) * 4") == 20
    with pytest.raises(ValueError, match="calculator expression"):
        data._evaluate_expression("__import__('os')")


def test_bad_split_or_family_is_named():
    with pytest.raises(ValueError, match="split"):
        list(data.generate_examples(1, split="test"))
    with pytest.raises(ValueError, match="poetry"):
        list(data.generate_examples(1, families={"poetry": 1.0}))


def test_a_single_digit_product_is_reasoned_as_the_fact_larger_products_use():
    # A held-out single-digit pair must be the fact the model practised inside other products,
    # not a phrase it only ever saw with that pair ("8 times 6 is ...").
    alone, inside = data._digits_reasoning_mul(8, 6), data._digits_reasoning_mul(48, 6)
    assert "8 * 6 = 48." in alone and "; 8 * 6 = 48." in inside
    assert "times" not in alone and alone.endswith("So 8 * 6 = 48.")
