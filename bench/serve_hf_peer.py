"""The Hugging Face transformers baseline for `serve_peers.py`: `model.generate`, one request at a time, behind a
minimal OpenAI-compatible streaming /v1/completions, so that the same load generator measures it.

    python bench/serve_hf_peer.py MODEL_DIR --port 8001 [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


class QueueStreamer:
    """A transformers streamer that hands each new token id to an asyncio queue (the first put is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def build_app(model_dir: Path) -> FastAPI:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    name = model_dir.name
    one_at_a_time = asyncio.Lock()
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        prompt_ids = tokenizer.encode(body["prompt"], add_special_tokens=False).ids
        max_tokens = int(body.get("max_tokens", 16))
        queue: asyncio.Queue = asyncio.Queue()

        async def events():
            async with one_at_a_time:
                streamer = QueueStreamer(asyncio.get_running_loop(), queue)
                kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
                if body.get("ignore_eos"):
                    kwargs["min_new_tokens"] = max_tokens
                thread = threading.Thread(
                    target=lambda: model.generate(torch.tensor([prompt_ids]), **kwargs), daemon=True
                )
                thread.start()
                count = 0
                while (token := await queue.get()) is not None:
                    count += 1
                    chunk = {"id": "hf", "object": "text_completion", "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "text": tokenizer.decode([token]) or " ", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                thread.join()
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                     "total_tokens": len(prompt_ids) + count}
            yield f"data: {json.dumps({'id': 'hf', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
