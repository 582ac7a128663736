"""Inference: a decoder-only transformer served with continuous batching, and the worker around it.

Modules, in the order data flows:
    tokenizer     TextTokenizer (tokenizer.json via `tokenizers`), load_tokenizer(path) (once per file)
    chat          chat templates (CHAT_TEMPLATES: render + stop), documented there
    registry      the model registry: ModelSpec (checkpoint, tokenizer, template, limits, Price) per model
    model         GPT-2 layout (GPT, GPTConfig), KVCache (preallocated slots), PackedBatch, checkpoints
    llama         Llama layout (Llama, LlamaConfig) on the same cache and packed attention
    checkpoint    load_model(directory, device, dtype): picks the layout from config.json
    request       Request, SamplingParams, FinishReason, InvalidRequest, WaitingQueueFull
    queue_policy  waiting-queue order: FCFS, or priority by tier with aging (create_waiting_queue)
    scheduler     Scheduler: token budget, chunked prefill, running cap, cache-slot admission
    sampler       greedy / temperature + top-p, per-request seeded generators
    detokenizer   incremental text with stop sequences held back
    engine        Engine: add_request / abort_request / step (schedule -> execute -> update)
    engine_loop   EngineLoop: the step loop on a thread, RequestStream per request on asyncio
    metrics       WorkerMetrics (Prometheus, one registry per worker)
    usage         build_usage_event: UsageRecorded priced in integer credits
    internal_auth the gateway -> worker shared secret (TOLLGATE_INTERNAL_TOKEN), one definition
worker        create_app(settings, emit_usage, engine=None, *, internal_token) -> FastAPI; `python -m
    inference.worker`
    settings      WorkerSettings / EngineSettings (TOLLGATE_WORKER_; shared: tollgate.common_settings)
    train_default `python -m inference.train_default` rebuilds default_model/
"""
