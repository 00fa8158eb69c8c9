"""kubetune.server: serves tuned LoRA adapters behind vLLM's OpenAI-compatible server.

- ``launcher`` (``python -m kubetune.server --config PATH``): checks adapters, execs vLLM;
- ``vllm_args``: pure builders of vLLM's argv and environment;
- ``adapter_checks``: reads adapter folders and refuses the ones vLLM cannot serve;
- ``adapters``: a small HTTP client that loads and unloads adapters on a running server
  (the operator imports it, so it needs only httpx and ``adapter_checks``).

It never imports vLLM (only its CLI and HTTP API are used), kopf or the Kubernetes client.
"""
