"""Request body of POST /evaluate: a loaded model by name, or a model folder with an optional adapter."""

from __future__ import annotations

from pydantic import Field, model_validator

from gpt_service.evaluation.job import Dtype, EvaluationOptions


class EvaluateRequest(EvaluationOptions):
    model_name: str | None = Field(None, min_length=1, max_length=128,
                                   description="A loaded model (with its adapter, if it was loaded with one).")
    model_path: str | None = Field(None, min_length=1, max_length=4096,
                                   description="Hub id or folder under models/, instead of model_name.")
    lora_adapter: str | None = Field(None, max_length=4096, description="Adapter folder under models/ "
                                     "(with model_path).")
    dtype: Dtype | None = Field(None, description="Weights precision with model_path; default: serve_dtype.")

    @model_validator(mode="after")
    def _one_model(self) -> EvaluateRequest:
        if (self.model_name is None) == (self.model_path is None):
            raise ValueError("name exactly one of model_name (a loaded model) or model_path (a model folder)")
        if self.model_name is not None and (self.lora_adapter or self.dtype):
            raise ValueError("lora_adapter and dtype go with model_path; a model_name brings its own")
        return self

    def options(self) -> EvaluationOptions:
        return EvaluationOptions.model_validate(self.model_dump(include=set(EvaluationOptions.model_fields)))
