"""The Hugging Face transformers baseline for `serve_peers.py`: batched `model.generate` behind a minimal
OpenAI-compatible streaming /v1/completions, so that the same load generator measures it.

Batched, not one request at a time: requests that arrive while a batch runs wait for the next one, and each batch
takes every waiting request (at most --max-batch), left-padded, in one `generate` call (static batching: the
strongest plain use of `generate`; a request joins at the next batch, not at the next step). Each step's tokens are
streamed to their requests as they come.

    python bench/serve_hf_peer.py MODEL_DIR --port 8001 [--threads 1] [--dtype fp32|bf16] [--max-batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Pending:
    """One request waiting for, or running in, a batch."""

    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class BatchStreamer:
    """A transformers streamer for a batch: each step's (batch,) new tokens go to their requests' queues, each
    request cut at its own max_tokens (the first put is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]):
        self.loop, self.batch, self.prompt_seen = loop, batch, False
        self.sent = [0] * len(batch)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for index, token in enumerate(value.reshape(-1).tolist()):
            pending = self.batch[index]
            if self.sent[index] < pending.max_tokens:
                self.sent[index] += 1
                self.loop.call_soon_threadsafe(pending.queue.put_nowait, token)
                if self.sent[index] == pending.max_tokens:
                    self.loop.call_soon_threadsafe(pending.queue.put_nowait, None)

    def end(self) -> None:
        for index, pending in enumerate(self.batch):
            if self.sent[index] < pending.max_tokens:
                self.loop.call_soon_threadsafe(pending.queue.put_nowait, None)


def run_batch(model: torch.nn.Module, batch: list[Pending], loop: asyncio.AbstractEventLoop, pad_id: int) -> None:
    """One left-padded `generate` over the batch (on a worker thread)."""
    width = max(len(p.prompt_ids) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p.prompt_ids)) + p.prompt_ids for p in batch])
    mask = torch.tensor([[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in batch])
    longest = max(p.max_tokens for p in batch)
    kwargs = dict(max_new_tokens=longest, do_sample=False, streamer=BatchStreamer(loop, batch), pad_token_id=pad_id,
                  attention_mask=mask)
    if all(p.ignore_eos for p in batch):
        kwargs["min_new_tokens"] = longest
    with torch.inference_mode():
        model.generate(ids, **kwargs)


def build_app(model_dir: Path, dtype: torch.dtype = torch.float32, max_batch: int = 64) -> FastAPI:
    """The baseline server over a Llama-format folder."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    name = model_dir.name
    waiting: asyncio.Queue[Pending] = asyncio.Queue()
    app = FastAPI()

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await waiting.get()]
            while not waiting.empty() and len(batch) < max_batch:
                batch.append(waiting.get_nowait())
            await asyncio.to_thread(run_batch, model, batch, loop, 0)

    @app.on_event("startup")
    async def start_batcher() -> None:
        app.state.batcher = asyncio.create_task(batcher())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        pending = Pending(tokenizer.encode(body["prompt"], add_special_tokens=False).ids,
                          int(body.get("max_tokens", 16)), bool(body.get("ignore_eos")))
        await waiting.put(pending)

        async def events():
            count = 0
            while (token := await pending.queue.get()) is not None:
                count += 1
                chunk = {"id": "hf", "object": "text_completion", "created": int(time.time()), "model": name,
                         "choices": [{"index": 0, "text": tokenizer.decode([token]) or " ", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(pending.prompt_ids), "completion_tokens": count,
                     "total_tokens": len(pending.prompt_ids) + count}
            yield f"data: {json.dumps({'id': 'hf', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = build_app(args.model_dir, DTYPES[args.dtype], args.max_batch)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
