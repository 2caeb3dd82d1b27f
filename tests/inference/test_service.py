"""The serving facade's event streams: what the engine's thread delivers reaches the event loop whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpt_service.inference.engine import Event
from gpt_service.inference.sampling import SamplingParams
from gpt_service.inference.service import InferenceService
from gpt_service.settings import ServiceSettings


def test_a_stream_read_late_gets_what_waited_as_one_piece(tiny_model: Path, tmp_path: Path) -> None:
    """A reader that falls behind the engine (a busy event loop) gets the pieces that waited merged into
    one event, the text and the counts unchanged; a reader that keeps up gets them one by one."""
    service = InferenceService(ServiceSettings(workspace=tmp_path))
    params = SamplingParams(max_tokens=40, temperature=0.0)

    async def read(late: bool) -> list[Event]:
        served, ids = service.encode("tiny", params.max_tokens, prompt="LoRA is a low rank adaptation")
        stream = service.stream(served, ids, params)
        if late:
            while served.base.engine.load != (0, 0):  # the whole answer is generated before the first read
                await asyncio.sleep(0.01)
        return [event async for event in stream]

    try:
        asyncio.run(asyncio.to_thread(service.registry.load, "tiny", str(tiny_model), None, "float32"))
        prompt = asyncio.run(read(late=False))
        late = asyncio.run(read(late=True))
    finally:
        service.close()
    assert len(late) == 1 < len(prompt)
    assert late[0].text == "".join(event.text for event in prompt)
    assert (late[0].finish_reason, late[0].completion_tokens) == (prompt[-1].finish_reason,
                                                                  prompt[-1].completion_tokens)
