"""POST /v1/completions: prompts as text or token ids (one or a list), `echo`, and logprobs in the legacy format
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); `echo` with `logprobs` scores the prompt."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from aiinfra.data.tokenizer import encode
from aiinfra.serve.async_engine import Delta
from aiinfra.serve.protocol import CommonRequest, CompletionRequest
from aiinfra.serve.request import TokenLogprobs
from aiinfra.serve.serving import ChoiceState, Generation, OpenAIServing, clamp


class CompletionServing(OpenAIServing):
    """Completions: tokenization of the prompts, echo, and the legacy logprobs block."""

    def logprobs_block(self, pairs: list[tuple[int, TokenLogprobs | None]], choice: ChoiceState) -> dict[str, Any]:
        """The legacy block for (token id, logprobs) pairs; advances the choice's text offset."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, entry in pairs:
            text = self.token_text(token_id)
            tokens.append(text)
            text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
            if entry is None:  # the first prompt token: nothing predicts it
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(clamp(entry.logprob))
            top = {self.token_text(token): clamp(logprob) for token, logprob in entry.top}
            top.setdefault(text, clamp(entry.logprob))  # the chosen token is always listed (OpenAI, vLLM)
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    def _prompt_pairs(self, generation: Generation, choice: ChoiceState,
                      prompt_logprobs: list[TokenLogprobs | None] | None) -> list[tuple[int, TokenLogprobs | None]]:
        prompt = generation.prompts[choice.prompt_index]
        return list(zip(prompt, prompt_logprobs or [None] * len(prompt)))

    def stream_choices(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[dict[str, Any]]:
        parsed: CompletionRequest = generation.parsed  # type: ignore[assignment]
        items = []
        if parsed.echo and not choice.started:  # the prompt, with its logprobs when asked, before the first text
            echo_logprobs = None
            if parsed.logprobs is not None:
                echo_logprobs = self.logprobs_block(self._prompt_pairs(generation, choice, delta.prompt_logprobs),
                                                    choice)
            else:
                choice.text_offset += len(generation.echo_texts[choice.prompt_index])
            items.append({"index": choice.index, "text": generation.echo_texts[choice.prompt_index],
                          "logprobs": echo_logprobs, "finish_reason": None})
        choice.started = True
        logprobs = None
        if delta.logprobs is not None:
            logprobs = self.logprobs_block(list(zip(delta.token_ids, delta.logprobs)), choice)
        items.append({"index": choice.index, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason})
        return items

    def final_choice(self, generation: Generation, choice: ChoiceState) -> dict[str, Any]:
        parsed: CompletionRequest = generation.parsed  # type: ignore[assignment]
        text = "".join(choice.texts)
        logprobs = None
        if parsed.echo:
            text = generation.echo_texts[choice.prompt_index] + text
        if parsed.logprobs is not None:
            pairs = self._prompt_pairs(generation, choice, choice.prompt_logprobs) if parsed.echo else []
            logprobs = self.logprobs_block(pairs + choice.logprobs, choice)
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def check_continuation(self, parsed: CommonRequest, prompts: list[list[int]], max_tokens: list[int]) -> None:
        if parsed.continuation is not None and isinstance(parsed, CompletionRequest) and parsed.echo:
            raise self.gate.reject(400, "invalid", "continuation resumes an answer: echo does not apply",
                                   param="echo")
        super().check_continuation(parsed, prompts, max_tokens)

    async def create(self, request: Request) -> Response:
        """The endpoint."""
        parsed = await self.gate.admit(request, CompletionRequest)
        reject = self.gate.reject
        prompt = parsed.prompt
        if isinstance(prompt, str):
            raw_prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            raw_prompts = [prompt]  # type: ignore[list-item]
        else:
            raw_prompts = list(prompt)  # type: ignore[arg-type]
        if not raw_prompts:
            raise reject(400, "invalid", "prompt is empty", param="prompt")
        tokenizer, vocab_size = self.served.tokenizer, self.served.model.spec.vocab_size
        prompts = []
        for item in raw_prompts:
            ids = encode(tokenizer, item) if isinstance(item, str) else list(item)
            if not ids:
                raise reject(400, "invalid", "prompt is empty: give at least one token", param="prompt")
            if any(not 0 <= token < vocab_size for token in ids):
                raise reject(400, "invalid", "prompt token ids must lie in the vocabulary", param="prompt")
            prompts.append(ids)
        max_tokens = [self.resolve_max_tokens(parsed.max_tokens, len(ids), 16, "prompt") for ids in prompts]
        echo_texts = [item if isinstance(item, str) else tokenizer.decode(item) for item in raw_prompts]
        return await self.respond(request, parsed, prompts, max_tokens, echo_texts)
