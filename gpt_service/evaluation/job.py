"""What one evaluation is asked to do. No torch here: the API, the task runner and the CLI share it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt_service.config import DatasetFormat
from gpt_service.errors import UserError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class EvaluationOptions(BaseModel):
    """The dataset and how to measure on it."""

    model_config = ConfigDict(extra="forbid")

    dataset_path: str = Field(..., min_length=1, max_length=4096,
                              description="Dataset file, in any format training reads.")
    dataset_format: DatasetFormat | None = Field(
        None, description="json, jsonl or txt; guessed from the file extension when omitted.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate only the first this many records.")
    max_length: int = Field(1024, ge=8, le=1_048_576, description="Tokens per sample; longer ones are cut.")
    batch_size: int = Field(8, ge=1, le=1024, description="Samples per forward pass of the loss.")
    compare_to_base: bool = Field(False, description="Also measure the base model without the adapter.")
    generation: bool | None = Field(
        None, description="Answer each prompt and score it against its reference; "
        "null: whenever the records have references (chat, instruction, prompt/completion).")
    max_tokens: int = Field(128, ge=1, description="Most tokens of each generated (greedy) answer.")
    num_examples: int = Field(3, ge=0, le=100, description="(prompt, reference, answer) samples to return.")


class EvaluationJob(EvaluationOptions):
    """A complete evaluation: options plus a model folder (or hub id) and an optional adapter folder.

    Stored as a task's request; the stored copy also carries `base_model` (the model path) so that
    task listings show the model as they do for trainings, hence unknown keys are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    model_path: str = Field(..., min_length=1, description="Base model folder or hub id.")
    lora_adapter: str | None = Field(None, description="LoRA adapter folder.")
    dtype: Dtype = Field("auto", description="Weights precision; auto = bf16 where the hardware has it.")
    model_name: str | None = Field(None, description="The served name the request used, for display.")

    def task_request(self) -> dict[str, object]:
        return {**self.model_dump(mode="json"), "base_model": self.model_path}


def check_comparison(options: EvaluationOptions, adapter: str | None) -> None:
    """compare_to_base needs an adapter to compare with its base."""
    if options.compare_to_base and not adapter:
        raise UserError("compare_to_base compares an adapter with its base model, but no lora_adapter is "
                        "given (or the named model has none)")
