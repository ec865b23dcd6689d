"""Request bodies of the OpenAI-compatible API, as pydantic models (their errors become OpenAI 400s)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from tokenyard.sampling_params import InvalidParameterError

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
MAX_STOPS, MAX_STOP_CHARS = 16, 256   # each stop string is searched for after every token
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None   # required, as in OpenAI's API (null only makes sense for tool calls)
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The plain {role, content} dict chat templates expect ("developer" is the newer "system")."""
        if isinstance(self.content, list):
            content = "".join(p.text for p in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _SamplingFields(BaseModel):
    """What chat and completion requests share. A field the server does not know is refused (400 naming it),
    never silently dropped."""

    model_config = ConfigDict(extra="forbid", strict=True)   # "16" is not a number, "yes" not a boolean

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)                 # extension
    min_tokens: int = Field(0, ge=0)                      # extension
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)   # int64, like OpenAI's
    stop: NonEmpty | list[NonEmpty] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False                              # extension
    priority: int = Field(0, ge=-(2**31), lt=2**31, strict=True)   # extension: lower is more urgent
    user: str | None = None                               # becomes the tenant
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)   # extension (vLLM's): prefix-cache scope
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None            # token id (as a string, OpenAI's way) -> [-100, 100]
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)   # extension (vLLM's)
    min_p: float | None = Field(None, ge=0, le=1)                   # extension (vLLM's)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)   # extension (vLLM's)
    skip_special_tokens: bool = True                                  # extension (vLLM's)
    # Accepted and ignored: bookkeeping that does not change what is generated (OpenAI's store/metadata/...).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None        # moot without tools, which are refused
    # vLLM's, honoured only in their default (anything else is refused by check_supported).
    include_stop_str_in_output: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise InvalidParameterError("stop", "stop strings must not be empty")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidParameterError("stop", f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} "
                                                "characters each")
        return stops

    def logit_bias_ids(self) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidParameterError("logit_bias", f"logit_bias keys are token ids; got {key!r}") from None
            out[token] = bias
        return out

    def check_supported(self) -> None:
        """Reject OpenAI parameters the engine cannot honour, instead of silently ignoring them."""
        if self.include_stop_str_in_output:
            raise InvalidParameterError("include_stop_str_in_output", "include_stop_str_in_output is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "stream_options is only allowed when stream is true")

    @property
    def tenant(self) -> str:
        return self.user or "default"


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None      # only "none" / "auto" (there are no tools to choose)
    response_format: dict | None = None
    modalities: list[str] | None = None        # only ["text"]
    reasoning_effort: str | None = None        # no reasoning model here: only null
    add_generation_prompt: bool = True         # vLLM's
    chat_template_kwargs: dict | None = None   # vLLM's: only empty

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidParameterError("tools", "tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidParameterError("response_format", "only response_format type 'text' is supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidParameterError("tool_choice", "tool_choice needs tools, which are not supported")
        if self.modalities not in (None, ["text"]):
            raise InvalidParameterError("modalities", "only the text modality is supported")
        if self.reasoning_effort is not None:
            raise InvalidParameterError("reasoning_effort", "this model does not reason; leave reasoning_effort out")
        if self.chat_template_kwargs:
            raise InvalidParameterError("chat_template_kwargs", "chat_template_kwargs are not supported")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidParameterError("echo", "echo is not supported")
        if self.suffix:
            raise InvalidParameterError("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidParameterError("best_of", "best_of other than n is not supported")

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: the API takes a string, a token list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidParameterError("prompt", "prompt must not be empty")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class PriorityUpdate(BaseModel):
    """Body of ``POST /v1/requests/{id}/priority`` (a tokenyard extension)."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(..., ge=-(2**31), lt=2**31, strict=True)   # lower is more urgent


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize`` (vLLM's): a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[TokenId] = Field(..., max_length=1 << 20)
