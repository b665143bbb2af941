"""Request bodies of the OpenAI and Anthropic APIs as pydantic models.

Top-level unknown fields are ignored (clients send many optional fields this server does not
use); nested objects keep theirs. Numbers are range-checked here with the API's documented
bounds, so a bad value is refused with the field's name before any work is done. Infinity
and NaN are refused everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_N = 128

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
PositiveInt = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra"]
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,128}$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class _Object(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


def check_json_schema(schema: Any, require_object: bool) -> dict:
    """A tool's parameter schema must be a valid JSON Schema describing an object."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    kind = schema.get("type")
    if require_object and kind != "object":
        raise ValueError('must be a JSON Schema with "type": "object"')
    if kind is not None and kind != "object":
        raise ValueError(f'must describe an object ("type": "object"), not {kind!r}')
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"is not a valid JSON Schema: {exc.message}") from None
    except Exception as exc:  # malformed beyond what the meta-schema check handles
        raise ValueError(f"is not a valid JSON Schema ({type(exc).__name__})") from None
    return schema


# --------------------------------------------------------------------------- OpenAI


class ContentPart(_Object):
    type: str
    text: str | None = None


class ToolCallFunction(_Object):
    name: ToolName
    arguments: str | dict[str, Any] = ""


class ToolCallIn(_Object):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Object):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Object):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict | None) -> dict | None:
        return None if value is None else check_json_schema(value, require_object=False)


class Tool(_Object):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Object):
    name: ToolName


class NamedToolChoice(_Object):
    type: Literal["function"]
    function: NamedFunction


class ThinkingConfig(_Object):
    type: Literal["enabled", "disabled"]


class StreamOptions(_Object):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Object):
    type: Literal["text"]


class _SamplingFields(_Request):
    """Fields shared by chat and text completions (OpenAI names, then vLLM's extras)."""

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # DeepSeek's thinking switch, and the chat-template kwargs of vLLM / SGLang
    thinking: ThinkingConfig | None = None
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field()]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    skip_special_tokens: bool | None = True


# --------------------------------------------------------------------------- Anthropic


class TextBlock(_Object):
    type: Literal["text"]
    text: str


class ImageBlock(_Object):
    type: Literal["image"]


class DocumentBlock(_Object):
    type: Literal["document"]


class ThinkingBlock(_Object):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Object):
    type: Literal["redacted_thinking"]
    data: str | None = None


class ToolUseBlock(_Object):
    type: Literal["tool_use"]
    id: str
    name: ToolName
    input: dict[str, Any]


ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(_Object):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | ToolUseBlock
    | ToolResultBlock,
    Field(discriminator="type"),
]


class AnthropicMessage(_Object):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(_Object):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"tool type {kind!r} is one of Anthropic's server tools, which "
                             "this server does not run; send custom tools (name, input_schema)")
        return value

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, value: dict) -> dict:
        return check_json_schema(value, require_object=True)


class AnthropicToolChoice(_Object):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(_Object):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: PositiveInt | None = None


class OutputConfig(_Object):
    effort: ReasoningEffort | None = None


class _AnthropicPrompt(_Request):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(_AnthropicPrompt):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool | None = False
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_AnthropicPrompt):
    pass
