"""POST /evaluate: loss, perplexity, token accuracy and answer scores of a model or adapter on a dataset.

A short evaluation answers at once, computed in a worker thread so the server keeps answering. A model
served by vLLM answers its questions from its vLLM server; its loss comes from the model loaded here.
One of more than `evaluate_task_threshold` samples is queued as a task of kind "evaluate" with the
trainings (202 with a task_id); GET /train/status/{task_id} follows it, and its `result` holds the
figures once it is completed. Everything a user can get wrong is checked before either starts.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response

from gpt_service.api.evaluation_schemas import EvaluateRequest
from gpt_service.api.responses import errors
from gpt_service.api.routes.serving import get_inference
from gpt_service.data.readers import Record
from gpt_service.errors import UserError
from gpt_service.evaluation.job import EvaluationJob, EvaluationOptions, check_comparison
from gpt_service.evaluation.samples import load_eval_set, read_eval_records
from gpt_service.settings import ServiceSettings
from gpt_service.tasks.submission import adapter_folder, dataset_file, model_location

router = APIRouter(tags=["evaluation"])


def _job(body: EvaluateRequest, options: EvaluationOptions, served: Any, settings: ServiceSettings) -> EvaluationJob:
    """The model to evaluate as folders: the loaded model's own, or the request's, confined to models/."""
    if served is not None:
        return EvaluationJob(**options.model_dump(), model_path=served.base.source,
                             lora_adapter=served.adapter_path, model_name=served.name,
                             dtype=str(served.base.dtype).removeprefix("torch."))
    assert body.model_path is not None
    adapter = adapter_folder(body.lora_adapter, settings)
    return EvaluationJob(**options.model_dump(), model_path=model_location(body.model_path, settings, "model_path"),
                         lora_adapter=adapter, dtype=body.dtype or settings.serve_dtype)


def _check_for_task(job: EvaluationJob, records: list[Record], tokenizer: Any) -> None:
    """What the task would find wrong, found now: a bad adapter folder, a bad record, no references."""
    from gpt_service.inference.registry import check_adapter
    from gpt_service.model_loading import load_tokenizer

    if tokenizer is None:
        if job.lora_adapter:
            check_adapter(Path(job.lora_adapter), job.model_path)
        tokenizer = load_tokenizer(job.model_path)
    load_eval_set(tokenizer, records, job)


@router.post("/evaluate", status_code=200, responses={
    202: {"description": "More samples than `evaluate_task_threshold`: queued as a task; follow its `task_id`."},
    **errors(400, 403, 404, 409, 413, 422, 429, 503)})
async def evaluate(body: EvaluateRequest, request: Request, response: Response) -> dict[str, Any]:
    settings: ServiceSettings = request.app.state.settings
    if body.max_tokens > settings.max_tokens_limit:
        raise UserError(f"max_tokens is {body.max_tokens}; this server allows at most {settings.max_tokens_limit}")
    dataset = dataset_file(body.dataset_path, settings, "dataset_path", body.dataset_format)
    options = body.options().model_copy(update={"dataset_path": str(dataset)})
    records = await asyncio.to_thread(read_eval_records, options)
    inference = get_inference(request)
    served = inference.get(body.model_name) if body.model_name else None
    job = _job(body, options, served, settings)
    served = served or inference.registry.find(job.model_path, job.lora_adapter, job.dtype)  # no second copy
    check_comparison(options, job.lora_adapter)
    if len(records) > settings.evaluate_task_threshold:
        await asyncio.to_thread(_check_for_task, job, records, served.base.tokenizer if served else None)
        store = request.app.state.store
        task_id = store.new_id()
        store.create(task_id, job.task_request(), None, kind="evaluate")
        response.status_code = 202
        return {"task_id": task_id, "status": "pending", "kind": "evaluate", "samples": len(records)}
    from gpt_service.evaluation.evaluate import evaluate_job, evaluate_served
    from gpt_service.inference.vllm.backend import VllmModel

    if isinstance(served, VllmModel):  # the answers from its vLLM server, the token figures from our forward
        return await asyncio.to_thread(evaluate_job, job, answer=partial(inference.vllm.greedy_answers, served))
    if served is not None:
        return await asyncio.to_thread(evaluate_served, served, records, options)
    return await asyncio.to_thread(evaluate_job, job)
