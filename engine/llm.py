"""Offline API in vLLM's shape: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Sequence

from engine.chat import render_chat
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, Logprob, RequestOutput, StepOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """Generates completions for batches of prompts (role `both`): in this process, plus one
    process per further rank with `tensor_parallel_size=N`."""

    def __init__(self, model: str | None = None, **kwargs):
        kwargs.setdefault("role", "both")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine's other tensor-parallel ranks (nothing to do with one rank)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Text prompts, token-id prompts (`list[int]` or `{"prompt_token_ids": [...]}`), or a list
        of either. One SamplingParams for all, or one per prompt."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        results: dict[str, RequestOutput] = {}
        try:
            self._add_all(prompts, params, priority, results)
        except Exception:
            for request_id in results:  # a bad prompt in the batch: drop the ones already queued
                self.engine.abort_request(request_id)
            raise
        return self._run(results, use_tqdm)

    def _add_all(self, prompts, params, priority, results: dict[str, RequestOutput]) -> None:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = str(next(self._ids))
            text, token_ids = _split_prompt(prompt)
            if token_ids is None:
                if not isinstance(text, str) or not text:
                    raise ValueError("the prompt is empty")
                token_ids = self.engine.tokenize(text)
            p.verify(self.engine.shape.vocab_size, self.engine.max_model_len, len(token_ids))
            self.engine.add_request(request_id, text, p, prompt_token_ids=token_ids,
                                    priority=priority[i] if priority else 0)
            results[request_id] = RequestOutput(
                request_id=request_id, prompt=text, prompt_token_ids=list(token_ids),
                outputs=[CompletionOutput(j, "", [], None, None) for j in range(p.n)])

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> list[int]:
        return render_chat(self.engine.tokenizer, messages, add_generation_prompt, chat_template)

    def _run(self, results: dict[str, RequestOutput], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(results)
        bar = _progress(len(results)) if use_tqdm and len(results) >= 32 else None
        try:
            while pending:
                for out in self.engine.step():
                    if out.prompt_logprobs is not None:
                        results[out.request_id].prompt_logprobs = self._decoded(out.prompt_logprobs)
                    if self._collect(results, out) and out.request_id in pending:
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
                if not self.engine.has_unfinished_requests() and pending:
                    raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
        finally:
            if bar is not None:
                bar.close()
            for request_id in pending:
                self.engine.abort_request(request_id)
        return list(results.values())

    def _decoded(self, entries) -> list[dict[int, Logprob] | None]:
        """vLLM's prompt_logprobs: None for the first prompt token, then each entry with its tokens' text."""
        tokenizer, texts = self.engine.tokenizer, {}

        def text(t: int) -> str:
            if t not in texts:
                texts[t] = tokenizer.decode([t], skip_special_tokens=False)
            return texts[t]
        return [None] + [{t: Logprob(lp.logprob, lp.rank, text(t)) for t, lp in entry.items()} for entry in entries]

    @staticmethod
    def _collect(results: dict[str, RequestOutput], out: StepOutput) -> bool:
        """Folds one step output into the request's result; True once all its sequences finished."""
        res = results[out.request_id]
        if out.index == 0 and not res.outputs[0].token_ids:
            res.num_cached_tokens = out.num_cached_tokens
        comp = res.outputs[out.index]
        comp.text += out.text_delta
        comp.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            if comp.logprobs is None:
                comp.logprobs = []
            comp.logprobs.extend(out.new_logprobs)
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + sum(
                lp[t] for lp, t in zip(out.new_logprobs, out.new_token_ids))
        if out.finished:
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        res.finished = all(c.finish_reason is not None for c in res.outputs)
        return res.finished


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req")


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # a single token-id prompt
        return [prompts]
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params


def _split_prompt(prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return prompt["prompt"], None
    return None, list(prompt)
