"""Synthetic task corpus for training small V4-architecture models (dsv4-tiny).

Every example is an OpenAI-form conversation whose assistant turns are the training targets.
Three families of tasks, each in "chat" and "thinking" mode:

- arithmetic: add, subtract, multiply small numbers; thinking mode reasons digit by digit,
  chat mode answers with the bare number;
- tool use: a handful of tools called with string and non-string arguments, followed by the
  tool's result and a final answer that uses it;
- conversation: greetings, "what can you do", "repeat after me" (pure copying, which tool
  arguments need) and multi-turn context (names, cities, follow-ups).

Generation is deterministic from a seed. Each example is drawn from a finite space of
*specs* (the task's parameters); a spec belongs to the evaluation split when a stable hash of
it falls in the held-out bucket, so no evaluation example ever appears in training, whatever
the seed or the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

THINKING_MODES = ("chat", "thinking")
EVAL_FRACTION_PERCENT = 5  # share of each task's spec space held out for evaluation

SYSTEM_PROMPTS = (
    "You are dsv4-tiny, a helpful assistant.",
    "You are a helpful assistant.",
    None,
)

CITIES = (
    "Paris", "London", "Beijing", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima",
    "Oslo", "Seoul", "Delhi", "Sydney", "Toronto", "Nairobi", "Dubai", "Shanghai", "Moscow",
    "Lisbon", "Vienna", "Prague", "Dublin", "Athens", "Bangkok", "Jakarta", "Mexico City",
    "New York", "San Francisco", "Buenos Aires", "Cape Town", "Helsinki", "Warsaw",
)
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear")
NAMES = (
    "Alice", "Bob", "Chen", "Dmitri", "Elena", "Fatima", "Gustav", "Hana", "Ivan", "Jun",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Ravi", "Sara", "Tomas",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")

# unit conversions: (from, to) -> factor (temperature handled separately)
CONVERSIONS: dict[tuple[str, str], float] = {
    ("km", "miles"): 0.621371,
    ("miles", "km"): 1.609344,
    ("kg", "lb"): 2.204623,
    ("lb", "kg"): 0.453592,
    ("m", "ft"): 3.280840,
    ("ft", "m"): 0.304800,
    ("l", "gallons"): 0.264172,
    ("gallons", "l"): 3.785412,
}
TEMPERATURE_UNITS = ("celsius", "fahrenheit")


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


TOOLS: list[dict] = [
    _function(
        "get_weather",
        "Get the current weather for a city.",
        {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": list(TEMPERATURE_UNITS)},
        },
        ["city"],
    ),
    _function(
        "convert_units",
        "Convert a quantity from one unit to another.",
        {
            "value": {"type": "number"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
        },
        ["value", "from_unit", "to_unit"],
    ),
    _function(
        "calculator",
        "Evaluate an arithmetic expression with integers, + - * and parentheses.",
        {"expression": {"type": "string"}},
        ["expression"],
    ),
    _function(
        "get_time",
        "Get the current local time in a city.",
        {"city": {"type": "string"}, "hour_format": {"type": "integer", "enum": [12, 24]}},
        ["city"],
    ),
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)
# How many tools a conversation offers besides the one it needs (weights of 0, 1, 2, 3 more).
EXTRA_TOOL_WEIGHTS = (0.35, 0.35, 0.15, 0.15)


@dataclass
class Example:
    """One conversation. `messages` ends with the last assistant turn (the final target).

    `expected` holds what evaluation checks, by family:
    arithmetic -> {"answer": int}; tool -> {"tool": name, "arguments": dict, "final": str};
    chat -> {"reply": str}.
    """

    family: str
    thinking_mode: str
    messages: list[dict]
    tools: list[dict] | None
    expected: dict = field(default_factory=dict)
    spec: tuple = ()


def _stable_bucket(spec: tuple) -> int:
    digest = hashlib.sha256(repr(spec).encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100


def is_held_out(spec: tuple) -> bool:
    """True when `spec` belongs to the evaluation split (never used for training)."""
    return _stable_bucket(spec) < EVAL_FRACTION_PERCENT


# ---------------------------------------------------------------- arithmetic


def _column_addition(a: int, b: int) -> str:
    """Right-to-left column addition of a and b. Every fact has two operands: a carry is added
    in its own step ("8 + 9 = 17, 17 + 1 = 18"), as three-operand facts were the ones a small
    model got wrong."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        carried = f", {x + y} + {carry} = {s}" if carry else ""
        steps.append(f"{x} + {y} = {x + y}{carried}, write {s % 10}")
        carry = s // 10
    if carry:
        steps.append(f"carry {carry}")
    return f"Add {a} and {b} column by column: " + "; ".join(steps) + "."


def _digits_reasoning_add(a: int, b: int) -> str:
    return f"{_column_addition(a, b)} So {a} + {b} = {a + b}."


def _column_subtraction(a: int, b: int) -> str:
    """Right-to-left column subtraction of b from a (a >= b), borrowing as on paper; a borrow
    is taken from the next column in its own two-operand step."""
    steps, borrow = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i, digit in enumerate(da):
        x, y = int(digit), int(db[i]) if i < len(db) else 0
        top = x - borrow
        paid = f"{x} - 1 = {top}, " if borrow else ""
        if top < y:
            steps.append(f"{paid}{top} < {y}, borrow: {top + 10} - {y} = {top + 10 - y}, "
                         f"write {top + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{paid}{top} - {y} = {top - y}, write {top - y}")
            borrow = 0
    return f"Subtract {b} from {a} column by column: " + "; ".join(steps) + "."


def _digits_reasoning_sub(a: int, b: int) -> str:
    if a >= b:
        return f"{_column_subtraction(a, b)} So {a} - {b} = {a - b}."
    return f"{b} is larger than {a}, so the result is negative. {_column_subtraction(b, a)} " \
        f"So {b} - {a} = {b - a} and {a} - {b} = {a - b}."


def _digits_reasoning_mul(a: int, b: int) -> str:
    tens, ones = a // 10, a % 10
    if tens == 0:  # the fact in the form every product's reasoning uses, so that a held-out
        # single-digit pair is the fact the model learned inside the other products
        return f"One digit by one digit: {a} * {b} = {a * b}. So {a} * {b} = {a * b}."
    return (
        f"Split {a} into {tens * 10} + {ones}: {tens} * {b} = {tens * b}, so "
        f"{tens * 10} * {b} = {tens * 10 * b}; {ones} * {b} = {ones * b}. "
        f"{_column_addition(tens * 10 * b, ones * b)} So {a} * {b} = {a * b}."
    )


ARITHMETIC_OPS = {
    "+": (lambda a, b: a + b, _digits_reasoning_add, range(0, 100), range(0, 100)),
    "-": (lambda a, b: a - b, _digits_reasoning_sub, range(0, 100), range(0, 100)),
    "*": (lambda a, b: a * b, _digits_reasoning_mul, range(2, 50), range(2, 10)),
}
ARITHMETIC_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Please calculate {a} {op} {b}.",
    "How much is {a} {op} {b}?",
)


# Training draws subtraction more often than the evaluation asks it: the model bundled before
# these weights (equal draws) got 85% of *training* subtractions right (addition 95%, products
# 100%), so it was short of subtraction practice, not of memory.
TRAINING_OP_WEIGHTS = {"+": 0.3, "-": 0.4, "*": 0.3}
# Bare products (chat mode) are trained over first operands up to 99, twice the evaluation's
# range: over its 2-49 alone the model recalled each of the ~370 training pairs and got under
# half of the held-out ones right. Products with reasoning keep 2-49, as widening those too
# spread the reasoning thin (README, "Not kept").
TRAINING_BARE_PRODUCT_FIRST = range(2, 100)


def _arithmetic(rng: random.Random, mode: str, held_out: bool) -> Example:
    while True:
        if held_out:  # the evaluation asks each operation equally often
            op = rng.choice(tuple(ARITHMETIC_OPS))
        else:
            op = rng.choices(tuple(TRAINING_OP_WEIGHTS), tuple(TRAINING_OP_WEIGHTS.values()))[0]
        fn, reason, range_a, range_b = ARITHMETIC_OPS[op]
        if op == "*" and mode == "chat" and not held_out:
            range_a = TRAINING_BARE_PRODUCT_FIRST
        a, b = rng.choice(range_a), rng.choice(range_b)
        spec = ("arithmetic", op, a, b)
        if is_held_out(spec) == held_out:
            break
    answer = fn(a, b)
    question = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, b=b, op=op)
    if mode == "thinking":
        reply = {"role": "assistant", "reasoning_content": reason(a, b), "content": str(answer)}
    else:
        reply = {"role": "assistant", "content": str(answer)}
    messages = _with_system(rng, [{"role": "user", "content": question}])
    return Example("arithmetic", mode, messages + [reply], None, {"answer": answer}, spec)


# ---------------------------------------------------------------- tools


def _weather_result(city: str, unit: str) -> dict:
    h = _stable_bucket(("weather", city))
    celsius = h % 35 - 5
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temperature, "unit": unit,
            "condition": CONDITIONS[h % len(CONDITIONS)]}


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


def _convert(value: float, from_unit: str, to_unit: str) -> float:
    if (from_unit, to_unit) == ("celsius", "fahrenheit"):
        return value * 9 / 5 + 32
    if (from_unit, to_unit) == ("fahrenheit", "celsius"):
        return (value - 32) * 5 / 9
    return value * CONVERSIONS[(from_unit, to_unit)]


def _tool_spec(rng: random.Random) -> tuple:
    tool = rng.choice(TOOL_NAMES)
    if tool == "get_weather":
        return (tool, rng.choice(CITIES), rng.choice(("", "celsius", "fahrenheit")))
    if tool == "convert_units":
        pairs = list(CONVERSIONS) + [("celsius", "fahrenheit"), ("fahrenheit", "celsius")]
        from_unit, to_unit = rng.choice(pairs)
        return (tool, rng.randint(1, 200), from_unit, to_unit)
    if tool == "calculator":
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        shape = rng.choice(("({a} + {b}) * {c}", "{a} * {c} - {b}", "{a} + {b} + {c}"))
        return (tool, shape.format(a=a, b=b, c=c))
    return (tool, rng.choice(CITIES), rng.choice((0, 12, 24)))


WEATHER_ASKS = (
    "What's the weather in {city}?",
    "How is the weather in {city} today?",
    "Is it cold in {city} right now?",
    "Tell me the current weather for {city}.",
    "Weather in {city}?",
)
WEATHER_UNIT_ASKS = (
    "What's the weather in {city} in {unit}?",
    "Give me the temperature in {city} in {unit}.",
    "How warm is it in {city}? Use {unit}.",
)
CONVERT_ASKS = (
    "Convert {value} {from_unit} to {to_unit}.",
    "How many {to_unit} is {value} {from_unit}?",
    "What is {value} {from_unit} in {to_unit}?",
)
CALC_ASKS = (
    "Use the calculator for {expr}.",
    "Calculate {expr} with the calculator tool.",
    "What does {expr} evaluate to? Please use the calculator.",
)
TIME_ASKS = (
    "What time is it in {city}?",
    "Tell me the local time in {city}.",
    "Current time in {city}, please.",
)
TIME_FORMAT_ASKS = (
    "What time is it in {city}? Use the {fmt}-hour clock.",
    "Local time in {city} in {fmt}-hour format?",
)


def _evaluate_expression(expr: str) -> int:
    # The corpus only produces integers, spaces, + - * and parentheses; reject anything else
    # so that eval() can never see a name or attribute.
    if set(expr) - set("0123456789+-*() "):
        raise ValueError(f"calculator expression {expr!r} has characters other than digits, "
                         "spaces, + - * and parentheses")
    return int(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - checked above


def _tool_turns(spec: tuple, rng: random.Random) -> tuple[str, dict, dict, str]:
    """(question, arguments, result, final answer) for a tool spec."""
    tool = spec[0]
    if tool == "get_weather":
        _, city, unit = spec
        if unit:
            question = rng.choice(WEATHER_UNIT_ASKS).format(city=city, unit=unit)
            arguments = {"city": city, "unit": unit}
        else:
            question = rng.choice(WEATHER_ASKS).format(city=city)
            arguments = {"city": city}
        result = _weather_result(city, unit or "celsius")
        symbol = "°C" if result["unit"] == "celsius" else "°F"
        final = f"It is {result['temperature']}{symbol} and {result['condition']} in {city}."
        return question, arguments, result, final
    if tool == "convert_units":
        _, value, from_unit, to_unit = spec
        question = rng.choice(CONVERT_ASKS).format(value=value, from_unit=from_unit,
                                                   to_unit=to_unit)
        arguments = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
        converted = _format_number(round(_convert(value, from_unit, to_unit), 2))
        result = {"value": float(converted), "unit": to_unit}
        final = f"{value} {from_unit} is {converted} {to_unit}."
        return question, arguments, result, final
    if tool == "calculator":
        _, expr = spec
        question = rng.choice(CALC_ASKS).format(expr=expr)
        value = _evaluate_expression(expr)
        return question, {"expression": expr}, {"result": value}, f"{expr} = {value}."
    _, city, fmt = spec
    if fmt:
        question = rng.choice(TIME_FORMAT_ASKS).format(city=city, fmt=fmt)
        arguments = {"city": city, "hour_format": fmt}
    else:
        question = rng.choice(TIME_ASKS).format(city=city)
        arguments = {"city": city}
    h = _stable_bucket(("time", city))
    hour, minute = h % 24, (h * 7) % 60
    if fmt == 12:
        shown = f"{(hour - 1) % 12 + 1}:{minute:02d} {'am' if hour < 12 else 'pm'}"
    else:
        shown = f"{hour:02d}:{minute:02d}"
    result = {"city": city, "time": shown}
    return question, arguments, result, f"It is {shown} in {city}."


def _offered_tools(rng: random.Random, needed: str) -> list[dict]:
    """The needed tool among a random few others, in random order. Requests offer different
    tool sets, and each tool schema costs about 70 prompt tokens on top of a fixed ~240-token
    template, so shorter lists also let a training step see more tool calls."""
    others = [t for t in TOOLS if t["function"]["name"] != needed]
    extra = rng.choices(range(len(EXTRA_TOOL_WEIGHTS)), EXTRA_TOOL_WEIGHTS)[0]
    offered = [TOOLS[TOOL_NAMES.index(needed)]] + rng.sample(others, extra)
    rng.shuffle(offered)
    return offered


def _tool_use(rng: random.Random, mode: str, held_out: bool, index: int) -> Example:
    while True:
        spec = _tool_spec(rng)
        if is_held_out(spec) == held_out:
            break
    question, arguments, result, final = _tool_turns(spec, rng)
    call_id = f"call_{index:06d}"
    call = {"role": "assistant", "content": "", "tool_calls": [{
        "id": call_id, "type": "function",
        "function": {"name": spec[0], "arguments": json.dumps(arguments)},
    }]}
    answer = {"role": "assistant", "content": final}
    if mode == "thinking":
        call["reasoning_content"] = f"The user needs {spec[0]}, so I will call it."
        answer["reasoning_content"] = "The tool returned the result; I will report it."
    system = rng.choice(SYSTEM_PROMPTS[:2])
    tools = _offered_tools(rng, spec[0])
    messages = [
        {"role": "system", "content": system, "tools": tools},
        {"role": "user", "content": question},
        call,
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        answer,
    ]
    expected = {"tool": spec[0], "arguments": arguments, "final": final}
    return Example("tool", mode, messages, tools, expected, spec)


# ---------------------------------------------------------------- conversation

CAPABILITIES = (
    "I can do arithmetic, check the weather, convert units, tell the time and use a "
    "calculator. What would you like to do?"
)
GREETINGS = ("Hi", "Hello", "Hello there!", "Good morning", "Hey", "Hi, how are you?")
CAPABILITY_ASKS = ("What can you do?", "How can you help me?", "What are you able to do?")
IDENTITY_ASKS = ("Who are you?", "What is your name?", "Introduce yourself.")
NAME_ASKS = ("What is my name?", "Do you remember my name?")
CITY_ASKS = ("Where do I live?", "Which city do I live in?")
# what a multi-turn conversation asks the model to recall, by kind: copying a word from earlier
# turns is the skill tool calls need for their arguments (city names above all)
RECALLED = {"name": NAMES, "colour": COLOURS, "city": CITIES}
IDENTITY = "I am dsv4-tiny, a small model with the DeepSeek-V4 architecture."


REPEAT_ASKS = ("Please repeat after me: {phrase}", "Say this back to me: {phrase}",
               "Repeat: {phrase}")
# words for "repeat after me": every name, city, colour, unit and weather word of the corpus
REPEAT_WORDS = NAMES + CITIES + COLOURS + CONDITIONS + TEMPERATURE_UNITS + \
    tuple(dict.fromkeys(unit for pair in CONVERSIONS for unit in pair))
# Echoing a random phrase is pure copying, which a small model otherwise learns late: tool
# arguments, final answers and recall all need it, so it gets a large share of conversation.
CONVERSATION_KINDS = {"repeat": 6, "greeting": 1, "capability": 1, "identity": 1, "name": 1,
                      "colour": 1, "city": 1, "followup": 1}


def _conversation(rng: random.Random, mode: str, held_out: bool) -> Example:
    while True:
        kind = rng.choices(list(CONVERSATION_KINDS), list(CONVERSATION_KINDS.values()))[0]
        if kind == "repeat":
            spec = ("chat", kind, tuple(rng.choice(REPEAT_WORDS)
                                        for _ in range(rng.randint(2, 5))))
        elif kind in RECALLED:
            spec = ("chat", kind, rng.choice(RECALLED[kind]))
        elif kind == "followup":
            spec = ("chat", kind, rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 9))
        else:
            spec = ("chat", kind, rng.randrange(6))
        if is_held_out(spec) == held_out:
            break
    turns: list[dict]
    if kind == "repeat":
        reply = " ".join(spec[2])
        turns = [{"role": "user", "content": rng.choice(REPEAT_ASKS).format(phrase=reply)}]
    elif kind == "greeting":
        reply = "Hello! " + CAPABILITIES
        turns = [{"role": "user", "content": GREETINGS[spec[2] % len(GREETINGS)]}]
    elif kind == "capability":
        reply = CAPABILITIES
        turns = [{"role": "user", "content": CAPABILITY_ASKS[spec[2] % len(CAPABILITY_ASKS)]}]
    elif kind == "identity":
        reply = IDENTITY
        turns = [{"role": "user", "content": IDENTITY_ASKS[spec[2] % len(IDENTITY_ASKS)]}]
    elif kind == "name":
        name = spec[2]
        reply = f"Your name is {name}."
        turns = [
            {"role": "user", "content": f"My name is {name}."},
            {"role": "assistant", "content": f"Nice to meet you, {name}!"},
            {"role": "user", "content": rng.choice(NAME_ASKS)},
        ]
    elif kind == "colour":
        colour = spec[2]
        reply = f"Your favourite colour is {colour}."
        turns = [
            {"role": "user", "content": f"My favourite colour is {colour}."},
            {"role": "assistant", "content": f"{colour.capitalize()} is a nice colour."},
            {"role": "user", "content": "What is my favourite colour?"},
        ]
    elif kind == "city":
        city = spec[2]
        reply = f"You live in {city}."
        turns = [
            {"role": "user", "content": f"I live in {city}."},
            {"role": "assistant", "content": f"{city} sounds like a nice place."},
            {"role": "user", "content": rng.choice(CITY_ASKS)},
        ]
    else:
        _, _, a, b, c = spec
        reply = str(a + b + c)
        turns = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"Now add {c}."},
        ]
    final = {"role": "assistant", "content": reply}
    if mode == "thinking":
        final["reasoning_content"] = _conversation_reasoning(kind, spec)
    messages = _with_system(rng, turns) + [final]
    return Example("chat", mode, messages, None, {"reply": reply}, spec)


def _conversation_reasoning(kind: str, spec: tuple) -> str:
    if kind == "followup":
        _, _, a, b, c = spec
        return f"Earlier {a} + {b} = {a + b}. Adding {c} gives {a + b + c}."
    if kind in RECALLED:
        return f"The user told me earlier: {spec[2]}."
    if kind == "repeat":
        return "The user wants the phrase back exactly."
    return "The user is starting a conversation."


def _with_system(rng: random.Random, turns: list[dict]) -> list[dict]:
    system = rng.choice(SYSTEM_PROMPTS)
    return ([{"role": "system", "content": system}] if system else []) + turns


# ---------------------------------------------------------------- corpus

FAMILY_WEIGHTS = {"arithmetic": 0.5, "tool": 0.25, "chat": 0.25}


def generate_examples(num_examples: int, seed: int = 0, split: str = "train",
                      families: dict[str, float] | None = None) -> Iterator[Example]:
    """Yield `num_examples` examples of `split` ("train" or "eval"), deterministic in `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    weights = families or FAMILY_WEIGHTS
    unknown = set(weights) - set(FAMILY_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {list(FAMILY_WEIGHTS)}")
    rng = random.Random(f"{split}:{seed}")
    held_out = split == "eval"
    names, probs = list(weights), list(weights.values())
    for index in range(num_examples):
        family = rng.choices(names, probs)[0]
        mode = rng.choice(THINKING_MODES)
        if family == "arithmetic":
            yield _arithmetic(rng, mode, held_out)
        elif family == "tool":
            yield _tool_use(rng, mode, held_out, index)
        else:
            yield _conversation(rng, mode, held_out)


def eval_examples(num_examples: int = 200, seed: int = 1234) -> list[Example]:
    """The fixed evaluation split: held-out specs only."""
    return list(generate_examples(num_examples, seed=seed, split="eval"))
