"""Rollout workers: document batches in, rollout batches tagged with the policy version out.

- `rollout_workers.worker.RolloutWorker`: the role (a Ray actor in the service);
- `rollout_workers.engines`: the engine interface, the native snapshot engine and the registry
  (`vllm_engine` is the optional vLLM engine).
"""
