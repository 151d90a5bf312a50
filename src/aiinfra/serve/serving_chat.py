"""POST /v1/chat/completions: messages through the model's chat template (a sandboxed Jinja environment with the
helpers Hugging Face templates call), a stream that announces the role first, and logprobs in the chat format
(`content`: token, logprob, bytes, top_logprobs)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aiinfra.data.tokenizer import encode
from aiinfra.serve.admission import Gate
from aiinfra.serve.async_engine import AsyncEngine, Delta
from aiinfra.serve.loading import ServedModel
from aiinfra.serve.protocol import ChatRequest
from aiinfra.serve.request import TokenLogprobs
from aiinfra.serve.serving import ChoiceState, Generation, OpenAIServing, clamp


def raise_exception(message: str) -> None:
    """What HF templates call to refuse a conversation (transformers defines the same)."""
    raise TemplateError(message)


def strftime_now(format_: str) -> str:
    """The current local time, formatted (transformers' helper; Llama 3.1+ templates print today's date)."""
    return datetime.now().strftime(format_)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: Jinja's own escapes HTML, which templates that print tool schemas do not want."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def chat_template_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox like transformers': trimmed blocks and the helpers its templates rely on."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


class ChatServing(OpenAIServing):
    """Chat: the template, the role announcement, and the chat logprobs format."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, engine: AsyncEngine, served: ServedModel, gate: Gate):
        super().__init__(engine, served, gate)
        self.template = chat_template_environment().from_string(served.chat_template)
        tokenizer = served.tokenizer
        self.eos_text = tokenizer.id_to_token(served.eos_token_id) if served.eos_token_id is not None else ""

    def logprobs_block(self, pairs: list[tuple[int, TokenLogprobs | None]]) -> dict[str, Any]:
        """OpenAI's chat logprobs for (token id, logprobs) pairs of generated tokens."""
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": clamp(logprob), "bytes": list(text.encode())}

        content = []
        for token_id, logprobs in pairs:
            assert logprobs is not None  # generated tokens always have them
            item = entry(token_id, logprobs.logprob)
            item["top_logprobs"] = [entry(token, logprob) for token, logprob in logprobs.top]
            content.append(item)
        return {"content": content, "refusal": None}

    def preamble(self, generation: Generation) -> list[dict[str, Any]]:
        return [{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for choice in generation.choices]

    def stream_choices(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[dict[str, Any]]:
        logprobs = None
        if delta.logprobs is not None:
            logprobs = self.logprobs_block(list(zip(delta.token_ids, delta.logprobs)))
        return [{"index": choice.index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": logprobs,
                 "finish_reason": delta.finish_reason}]

    def final_choice(self, generation: Generation, choice: ChoiceState) -> dict[str, Any]:
        parsed: ChatRequest = generation.parsed  # type: ignore[assignment]
        logprobs = self.logprobs_block(choice.logprobs) if parsed.logprobs else None
        return {"index": choice.index, "message": {"role": "assistant", "content": "".join(choice.texts)},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}

    async def create(self, request: Request) -> Response:
        """The endpoint."""
        parsed = await self.gate.admit(request, ChatRequest)
        messages = [{"role": message.role, "content": message.text()} for message in parsed.messages]
        try:
            text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.served.bos_token,
                                        eos_token=self.eos_text)
        except Exception as error:  # a template may raise on role orders it does not accept
            raise self.gate.reject(400, "invalid", f"messages: the chat template refused them: {error}",
                                   param="messages") from None
        ids = encode(self.served.tokenizer, text)
        if not ids:
            raise self.gate.reject(400, "invalid", "messages: the chat template rendered them as no tokens",
                                   param="messages")
        requested = parsed.max_completion_tokens or parsed.max_tokens
        max_tokens = self.resolve_max_tokens(requested, len(ids), None, "messages")
        return await self.respond(request, parsed, [ids], [max_tokens], [""])
