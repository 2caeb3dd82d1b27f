"""The vLLM backend: our API, registry and adapters, with a vLLM OpenAI server per base model doing the serving.

`process` starts and watches one vLLM server, `client` speaks its HTTP API, `backend` keeps the names
served by vLLM and routes their requests. None of them imports vLLM: it lives in a virtualenv of its
own (scripts/setup-vllm.sh), and runs in its own processes.
"""
