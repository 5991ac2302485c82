"""Request and response bodies of the OpenAI-compatible API, plus our decoding extensions.

Field names follow OpenAI (`max_tokens`, `stop`, `top_p`, `seed`, `stream`, `stream_options`); the
diffusion-specific knobs (`steps`, `block_length`, `threshold`, `policy`, `diffusing`, ...) are extra
top-level fields, the way OpenAI clients pass them (`extra_body=` in the Python client). The policy names
and their own knobs (`threshold`, `factor`, `entropy_bound`, ...) come from the policy registry
(decoding/policies.py): each knob is a field, validated by the policy's declaration (GET /v1/policies).

Unknown fields are rejected (422 naming the field) so a typo such as `temprature` is not silently ignored;
OpenAI features we do not have (`tools`, `response_format`, ...: UNSUPPORTED) and OpenAI fields we cannot
honour (`echo` in chat, prompt log-probabilities) get a 400 saying so. Numbers and booleans are strict, as
OpenAI's are ("8" is not an integer, "yes" not a boolean), and every float must be finite (Python's JSON
parser takes NaN and Infinity).

`logprobs` are the model's log-probabilities of each answer token at the denoising step that committed it
(before logit_bias and penalties, as vLLM's default), with the most likely alternatives at that step:
completions take `logprobs: k` and answer in the legacy form (tokens, token_logprobs, top_logprobs,
text_offset); chat takes `logprobs: true, top_logprobs: k` and answers `{"content": [...]}`.
Limits that depend on the model or the server (context length, max tokens/steps) are checked in
`check_limits`, also naming the field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (AllowInfNan, BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from unmask.decoding.options import MAX_TOP_LOGPROBS, DecodeOptions
from unmask.decoding.params import Param
from unmask.decoding.policies import POLICIES, declared_params, param_problem
from unmask.edit.spans import has_markers
from unmask.errors import UnmaskError


class ApiError(UnmaskError):
    """An error the HTTP layer turns into an OpenAI error body: {"error": {"message", "type", "param"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param
        self.type = type or ("rate_limit_error" if status == 429 else "invalid_request_error")


@dataclass
class ServerLimits:
    """Per-request bounds; a request outside them gets a 400 naming the field."""

    max_tokens: int = 1024  # also capped by the model context
    max_steps: int = 4096
    max_prompt_chars: int = 200_000
    max_messages: int = 256
    max_stop: int = 4  # as OpenAI
    max_stop_chars: int = 64
    max_choices: int = 16  # prompts x n in one request
    max_body_bytes: int = 2_000_000  # whole HTTP body; larger -> 413
    max_spans: int = 64  # spans of one edit (denoised as requests of the shared engine)


# strict JSON types, as OpenAI's: no "8" for 8, no "yes" for true; a float is a finite number (or an integer)
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]

# OpenAI features this server does not have: a 400 whose message the OpenAI client shows, naming the field
# (not the 422 of an unknown field); null is "not set", as OpenAI takes it
UNSUPPORTED = {
    "tools": "tools are not supported by this server",
    "tool_choice": "tool_choice: tools are not supported by this server",
    "parallel_tool_calls": "parallel_tool_calls: tools are not supported by this server",
    "functions": "functions are not supported by this server",
    "function_call": "function_call: functions are not supported by this server",
    "response_format": "response_format is not supported by this server: answers are plain text",
    "best_of": "best_of is not supported by this server (ask for n choices instead)",
    "audio": "audio is not supported by this server",
    "modalities": "modalities are not supported by this server: answers are text",
    "prediction": "prediction (predicted outputs) is not supported by this server",
    "web_search_options": "web_search_options: web search is not supported by this server",
}


def valid_unicode(value: Any) -> Any:
    """JSON may escape half a surrogate pair ("\\ud83d"), which no tokenizer can encode: a 422, not a 500."""
    if isinstance(value, list):
        for item in value:
            valid_unicode(item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError("unicode", "not valid Unicode: lone surrogate {char} at character {at}",
                                      {"char": repr(value[e.start]), "at": e.start}) from None
    return value


@functools.cache
def knob_type(param: Param) -> TypeAdapter:
    """The strict JSON type of a policy's knob (its range is the declaration's: `param_problem`)."""
    return TypeAdapter(Int if param.kind is int else Float)


def document_policies(schema: dict[str, Any]) -> None:
    """JSON schema of the request bodies: the registered policies' names and knobs, as the registry has them."""
    props = schema.setdefault("properties", {})
    props.pop("knobs", None)  # filled from the top-level knobs below
    if "policy" in props:
        props["policy"]["enum"] = [*POLICIES, None]
    bounds = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for p in declared_params().values():
        users = [name for name, cls in POLICIES.items() if p in cls.params]
        props[p.name] = {"type": "integer" if p.kind is int else "number", "default": None,
                         "description": f"{p.help} ({', '.join(users)})",
                         **{key: getattr(p, b) for b, key in bounds.items() if getattr(p, b) is not None}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool = False


class DecodingFields(BaseModel):
    """Decoding options shared by every endpoint (OpenAI names where OpenAI has one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=document_policies)

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1, description="tokens of new text to generate (default 128)")
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=1)
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0, description="as OpenAI: discourage tokens already generated")
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0, description="as OpenAI: ... by how often they were")
    # torch seeds a generator with a 64-bit integer; a larger one would fail inside the engine (500)
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    # diffusion decoding
    steps: Int | None = Field(None, ge=1, description="total denoising steps; implies policy 'fixed' unless set")
    block_length: Int | None = Field(None, ge=1)
    policy: str | None = Field(None, description="the unmasking policy (GET /v1/policies lists them)")
    # the policies' knobs (threshold, factor, entropy_bound, ...): top-level fields, kept here by `policy_knobs`
    knobs: dict[str, Any] = Field(default_factory=dict, exclude=True)
    confidence: Literal["prob", "margin", "entropy", "random"] | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    self_correct: Bool | None = None
    heal: Bool | None = Field(None, description="token healing of a text prompt (default on)")
    diffusing: Bool = Field(False, description="stream every denoising state (whole text, masks shown) instead of deltas")
    n: Int = 1  # choices per prompt
    logit_bias: dict[str, Annotated[Float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, as OpenAI")
    # OpenAI fields accepted for compatibility; only their neutral values are allowed
    echo: Bool = False
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def policy_knobs(cls, body: Any) -> Any:
        """Each registered policy's knob is a top-level field (null: not set), checked by its declaration: a
        422 naming it, and the policy that reads it when the value is out of its range."""
        if not isinstance(body, dict):
            return body
        if "knobs" in body:
            raise ApiError("knobs: not a request field (give each policy parameter at the top level)", 422, "knobs")
        knobs = {}
        for name, param in declared_params().items():
            if body.get(name) is None:
                continue
            try:
                value = knob_type(param).validate_python(body[name])
            except ValidationError as e:
                raise ApiError(f"{name}: {e.errors()[0]['msg']}", 422, name) from None
            problem = param_problem(name, body[name], body.get("policy"))  # as the client wrote it
            if problem:
                raise ApiError(f"{name}: {problem}", 422, name)
            knobs[name] = value
        return {**{k: v for k, v in body.items() if k not in knobs and k not in declared_params()}, "knobs": knobs}

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, body: Any) -> Any:
        """An OpenAI feature we do not have (UNSUPPORTED) is a 400 naming it, before any other check."""
        if not isinstance(body, dict):
            return body
        asked = next((k for k, v in body.items() if k in UNSUPPORTED and v is not None), None)
        if asked is not None:
            raise ApiError(UNSUPPORTED[asked], 400, asked)
        return {k: v for k, v in body.items() if k not in UNSUPPORTED}

    @field_validator("policy")
    @classmethod
    def registered_policy(cls, policy: str | None) -> str | None:
        if policy is not None and policy not in POLICIES:
            raise PydanticCustomError("policy", "must be one of {names}, got {policy}",
                                      {"names": ", ".join(POLICIES), "policy": repr(policy)})
        return policy

    @field_validator("n", "stream", "echo", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API takes null for these (clients send it for "not set"): the default, not a 422."""
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="after")
    def stream_options_need_stream(self) -> "DecodingFields":
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer it
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self

    def tokens_field(self) -> str:
        """The name the client gave its token budget under (errors name the field the client sent)."""
        return "max_tokens"

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def wanted_logprobs(self) -> int | None:
        """Alternatives per token the answer reports (0: the token's own only), None: no logprobs."""
        return None

    def logit_bias_ids(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            bad = next(t for t in self.logit_bias if not t.strip().lstrip("-").isdigit())
            raise ApiError(f"logit_bias: keys are token ids, got {bad!r}", 400, "logit_bias") from None

    def decode_options(self, base: DecodeOptions) -> DecodeOptions:
        """The request's DecodeOptions on top of the server defaults (raises OptionsError on bad combos)."""
        changes: dict[str, Any] = {}
        for ours, theirs in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"), ("steps", "steps"),
                             ("block_length", "block_length"), ("policy", "policy"), ("confidence", "confidence"),
                             ("cache", "cache"),
                             ("self_correct", "self_correct"), ("heal", "heal"),
                             ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty")):
            value = getattr(self, theirs)
            if value is not None:
                changes[ours] = value
        # a step count only means something to the fixed-step schedule
        if self.steps is not None and self.policy is None:
            changes["policy"] = "fixed"
        changes.update(self.knobs)
        changes["stop"] = self.stop_list()
        changes["logit_bias"] = self.logit_bias_ids()
        changes["logprobs"] = self.wanted_logprobs()
        return base.replace(**changes)


class CompletionRequest(DecodingFields):
    prompt: str | list[Int] | list[str] | list[list[Int]] = Field(
        ..., description="text, token ids, or a list of either: one choice (n choices) per prompt")
    suffix: str | None = Field(None, description="text after the gap: the model fills the middle (infilling)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="log-probabilities of the answer's tokens and of this many alternatives")

    check_unicode = field_validator("prompt", "suffix")(valid_unicode)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are passed to the template as-is
    role: Literal["system", "developer", "user", "assistant"]
    content: str | None  # null only in an assistant message (OpenAI's, e.g. one that called a tool)

    check_unicode = field_validator("content")(valid_unicode)

    @field_validator("role")
    @classmethod
    def developer_is_system(cls, role: str) -> str:
        """OpenAI's current name for system instructions; chat templates know them as "system"."""
        return "system" if role == "developer" else role

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content: Any) -> Any:
        """OpenAI clients may send content as parts, [{"type": "text", "text": ...}]: the text is their join."""
        if not isinstance(content, list):
            return content
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        if any(k != "text" or not isinstance(p.get("text"), str) for k, p in zip(kinds, content)):
            raise PydanticCustomError("content_parts", "only text parts (type 'text' with a 'text' string) are "
                                      "supported, got {kinds}", {"kinds": kinds})
        return "".join(p["text"] for p in content)

    @model_validator(mode="after")
    def null_content_is_an_empty_assistant_turn(self) -> "ChatMessage":
        if self.content is None:
            if self.role != "assistant":
                raise PydanticCustomError("content", "content: null is only allowed in an assistant message")
            self.content = ""
        return self


# what the server itself passes to a chat template (tokenizer.apply_chat_template): a client's variable of the
# same name would collide with it
TEMPLATE_ARGUMENTS = ("messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token")


class ChatCompletionRequest(DecodingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    # OpenAI's current name for max_tokens in chat (its SDK documents max_tokens as deprecated there)
    max_completion_tokens: Int | None = Field(None, ge=1)
    # vLLM's name: extra chat template variables, e.g. {"enable_thinking": false} for Qwen3-based models
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: Bool | None = Field(None, description="report the answer's tokens with their log-probabilities")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")
    # OpenAI request fields that change nothing here: accepted (type-checked) and ignored
    metadata: dict[str, str] | None = Field(None, description="OpenAI's stored-completion tags: ignored")
    store: Bool | None = Field(None, description="OpenAI's completion storage: ignored (nothing is stored)")
    reasoning_effort: str | None = Field(None, description="OpenAI's reasoning models' knob: ignored")
    service_tier: str | None = Field(None, description="OpenAI's processing tier: ignored")

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    @field_validator("chat_template_kwargs")
    @classmethod
    def template_variables_are_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            if not key.isidentifier() or key in TEMPLATE_ARGUMENTS:
                raise PydanticCustomError("template_variable", "'{key}' cannot be a chat template variable "
                                          "(the server sets {reserved})",
                                          {"key": key, "reserved": ", ".join(TEMPLATE_ARGUMENTS)})
        return value

    @model_validator(mode="after")
    def max_completion_tokens_is_max_tokens(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:  # as OpenAI answers it
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs set to true")
        return self


class EditRequest(DecodingFields):
    """Instant Edit. `spans` are [start, end) character ranges of `input` to rewrite."""

    input: str
    mode: Literal["spans", "auto", "instruction"] | None = None  # default: spans if given (or <<< >>> markers),
    # else instruction if given, else auto
    spans: list[tuple[Int, Int]] | None = None
    instruction: str | None = None
    strength: Float | None = Field(None, ge=0.0, le=1.0, description="instruction mode: share of the text re-noised")
    flag_below: Float | None = Field(None, gt=0.0, lt=1.0, description="auto mode: re-mask tokens with p below this")
    max_rounds: Int | None = Field(None, ge=1, le=16, description="auto mode: correction rounds")
    length: Literal["absorb", "search", "fixed"] | None = Field(None, description="how a span's new length is chosen")

    check_unicode = field_validator("input", "instruction")(valid_unicode)

    def resolved_mode(self) -> str:
        if self.mode:
            return self.mode
        # spans given (even none: then a 400 says to give some) or markers, which are spans written in the text
        if self.spans is not None or has_markers(self.input):
            return "spans"
        return "instruction" if self.instruction else "auto"


def check_limits(req: DecodingFields, limits: ServerLimits, context: int, vocab_size: int) -> None:
    """Bounds that pydantic cannot know: the server's limits and the model's context."""

    def need(ok: bool, message: str, param: str) -> None:
        if not ok:
            raise ApiError(message, 400, param)

    need(req.n >= 1, f"n: must be at least 1, got {req.n}", "n")
    need(not req.echo or isinstance(req, CompletionRequest), "echo: only completions echo their prompt", "echo")
    need(not req.echo or req.wanted_logprobs() is None,
         "logprobs: a diffusion decoder does not score the prompt, so echo cannot come with logprobs "
         "(score text with `unmask eval elbo` or the lm-eval adapter)", "logprobs")
    bias = req.logit_bias_ids()
    bad = next((t for t in bias if not 0 <= t < vocab_size), None)
    need(bad is None, f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias")
    max_tokens, field = min(limits.max_tokens, context), req.tokens_field()
    need(req.max_tokens is None or req.max_tokens <= max_tokens,
         f"{field}: {req.max_tokens} is above this server's limit of {max_tokens}", field)
    need(req.steps is None or req.steps <= limits.max_steps,
         f"steps: {req.steps} is above this server's limit of {limits.max_steps}", "steps")
    stops = req.stop_list()
    need(len(stops) <= limits.max_stop, f"stop: at most {limits.max_stop} stop sequences", "stop")
    need(all(0 < len(s) <= limits.max_stop_chars for s in stops),
         f"stop: each stop sequence must have 1 to {limits.max_stop_chars} characters", "stop")
    if req.diffusing and not req.stream:
        raise ApiError("diffusing: needs stream=true (it streams every denoising state)", 400, "diffusing")
