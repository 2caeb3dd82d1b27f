"""Request bodies of the serving API (the guide's /models/load and /generate, and OpenAI's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt_service.config import QuantizationSettings


def model_name_field(example: str) -> Any:
    return Field(..., min_length=1, max_length=128, pattern=r"^[\w.:/@+-]+$",
                 description="The name requests use for this model.", examples=[example])


ModelName = model_name_field("my-fine-tuned-model")
StopField = Field(None, description="Up to 8 strings that end the answer (not included in it).")
MAX_STOP = 8
GUIDE_PROMPT = "用户：介绍一下Python\n助手："


class VllmOptions(BaseModel):
    """Engine options of the vLLM server a load starts (only when it starts one: a base's server is shared)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int | None = Field(None, ge=1, le=1024, description="GPUs each layer is split over.")
    pipeline_parallel_size: int | None = Field(None, ge=1, le=1024, description="Stages the layers are split in.")
    max_model_len: int | None = Field(None, ge=16, description="Context length (default: the model's).")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="Share of each GPU's memory used.")
    enforce_eager: bool | None = Field(None, description="No CUDA graphs: a faster start, slower decoding.")

    def args(self) -> list[str]:
        """The vLLM command line flags for the options set."""
        flags: list[str] = []
        for name, value in self.model_dump(exclude_none=True).items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                flags += [flag] if value else []
            else:
                flags += [flag, str(value)]
        return flags


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = ModelName
    model_path: str = Field(..., min_length=1, max_length=4096, description="Hub id or folder under models/.")
    lora_adapter: str | None = Field(None, max_length=4096, description="Adapter folder under models/.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights precision; default: the server's serve_dtype (auto = bf16 where fast).")
    replace: bool = Field(False, description="Replace a model already loaded under this name.")
    backend: Literal["builtin", "vllm"] | None = Field(
        None, description="What serves it: our engine, or a vLLM server started for its base model (default: the "
        "server's serving_backend).")
    vllm: VllmOptions | None = Field(None, description="Engine options of the vLLM server, when this load starts "
                                     "one (backend vllm only).")
    quantization: QuantizationSettings | None = Field(
        None, description='Load the base in 4 or 8 bits (bitsandbytes), e.g. {"bits": 4, "type": "nf4"}, as a QLoRA '
        "adapter was trained; computing in dtype (builtin backend only).")


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = model_name_field("my-old-model")


class SamplingFields(BaseModel):
    """Sampling options shared by /generate and the OpenAI routes."""

    max_tokens: int = Field(128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy (and so is anything below 1e-5).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=100_000, description="0 turns top-k off.")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="Above 1 discourages repeats.")
    stop: str | list[str] | None = StopField
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same text.")
    stream: bool = Field(False, description="Server-sent events, one per piece of text.")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="The text to continue.", examples=[GUIDE_PROMPT])
    model_name: str = ModelName


class OpenAIFields(SamplingFields):
    """OpenAI's field names and defaults; unknown fields are ignored, as OpenAI clients send extras."""

    model_config = ConfigDict(extra="ignore")

    model: str = ModelName
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    n: int = Field(1, ge=1, le=16)
    stream_options: dict | None = None

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] = Field(..., description="One prompt (a list must hold exactly one).",
                                    examples=[GUIDE_PROMPT])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] = ""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateAnswer(BaseModel):
    """The answer of /generate without `stream`."""

    text: str = Field(..., description="The generated text (stop strings and the end token left out).")
    model_name: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
