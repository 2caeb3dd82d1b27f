"""Sampling parameters cannot make NaN: tiny temperatures are greedy, and NaN or infinite ones are refused."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from gpt_service.api.serving_schemas import CompletionRequest, GenerateRequest
from gpt_service.inference.sampling import GREEDY_BELOW, SamplingParams, sample_row

LOGITS = torch.tensor([-3e4, 2.0, 7.5, 3e4, -1.0])


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 1e-30, GREEDY_BELOW / 2])
def test_a_tiny_temperature_is_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature)
    assert params.greedy and sample_row(LOGITS, params, torch.empty(0, dtype=torch.long), None) == 3


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-3, 2.0])
def test_the_smallest_sampled_temperature_stays_finite(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=temperature, top_p=0.9, top_k=3)
    assert sample_row(LOGITS, params, torch.empty(0, dtype=torch.long), generator) == 3


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-1"])
@pytest.mark.parametrize("schema", [GenerateRequest, CompletionRequest])
def test_nan_or_infinite_sampling_parameters_are_refused(schema: type, value: str) -> None:
    name = "model_name" if schema is GenerateRequest else "model"
    body = json.dumps({"prompt": "x", name: "m"})[:-1]
    for field in ("temperature", "top_p"):
        assert schema.model_validate_json(f'{body}, "{field}": 0.5}}')
        with pytest.raises(ValidationError):
            schema.model_validate_json(f'{body}, "{field}": {value}}}')
