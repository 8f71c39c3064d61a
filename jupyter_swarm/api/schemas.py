"""What the API's requests may ask for (pydantic): the OpenAI fields it supports, and clear refusals for the rest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI request fields this API knows but does not implement: asking for them gets a 400 naming the field
UNSUPPORTED = {
    "best_of": "best_of > 1", "echo": "echo", "suffix": "suffix", "logprobs": "logprobs",
    "top_logprobs": "top_logprobs", "logit_bias": "logit_bias", "tools": "tools", "tool_choice": "tool_choice",
    "functions": "functions", "function_call": "function_call", "response_format": "response_format",
    "presence_penalty": "presence_penalty other than 0", "frequency_penalty": "frequency_penalty other than 0",
    "parallel_tool_calls": "parallel_tool_calls", "audio": "audio", "modalities": "modalities",
    "prediction": "prediction", "reasoning_effort": "reasoning_effort",
}
#: values of those fields that mean "not asked for" (OpenAI's defaults), which are accepted
NOT_ASKED = {"best_of": (None, 1), "echo": (None, False), "logprobs": (None, False), "presence_penalty": (None, 0),
             "frequency_penalty": (None, 0), "parallel_tool_calls": (None, True)}


class _Request(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="allow")  # unknown fields are refused in unsupported_fields(), by name

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one choice per request); send several requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported_fields(self) -> list[str]:
        """Fields of the request this API does not implement (described for the error message)."""
        extra = self.model_extra or {}
        return [UNSUPPORTED.get(name, name) for name, value in extra.items()
                if name not in NOT_ASKED or value not in NOT_ASKED[name]]

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("give one prompt (a string); batches of prompts are not supported")
            prompt = prompt[0]
        return prompt


class TextPart(BaseModel):
    """A text part of a message's content (the only kind of part this API reads)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (OpenAI's "developer" role is the system prompt)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
