"""router/pipeline.py in process against scripted node stubs (tests/router/fakes.py): retries before
the first token, decode reservation fallback, the local-prefill path, every way a stream ends, the
node's text and finish relayed as sent, and the aborts a cancelled completion sends."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.rpc.errors import RpcError
from engine.sampling_params import SamplingParams
from router.policy import Placement
from tests.router.fakes import (FR, HANG, PROMPT, Cluster, Slow, collect, first_token, make_registry, pipeline,
                                rpc_error, tokens, transfer_done)

pytestmark = pytest.mark.timeout(30)
S = grpc.StatusCode
HELLO, WORLD, DOT, THE, END = 38699, 905, 30, 378, 1112  # " Hello", " world", ".", " The", " end"
LLAMA = [15107, 116, 243]  # " 🦙": a space and the emoji's first bytes, then its last two bytes
EOS = 2  # the default model's <|im_end|>


def run(coro):
    return asyncio.run(coro)


# ---- prefill retries before the first token ------------------------------------------------------

@pytest.mark.parametrize("failure", [[rpc_error(S.UNAVAILABLE, "connection refused")], [rpc_error(S.CANCELLED)],
                                     []], ids=["unavailable", "cancelled", "ended-without-a-token"])
def test_prefill_failing_before_the_first_token_moves_to_another_prefill_node(default_tokenizer, failure):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[failure, [first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8), tokens(9, finish=FR.FINISH_REASON_LENGTH)]])
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=3))
        assert [c.token_ids for c in chunks] == [[7], [8], [9]]
        assert chunks[-1].finish_reason == FR.FINISH_REASON_LENGTH
        assert cluster.called("Prefill") == ["prefill-0", "prefill-1"]
        assert cluster.called("Reserve") == ["decode-0", "decode-0"]  # a fresh reservation for the retry
        assert sorted(cluster.aborts) == ["decode-0", "prefill-0"]  # the failed attempt is freed on both
    run(main())


def test_prefill_refusing_the_request_is_forwarded_not_retried(default_tokenizer):
    async def main():
        cluster = Cluster(
            prefill_scripts=[[rpc_error(S.INVALID_ARGUMENT, "prompt too long")]], decode_scripts=[],
            tokenizer=default_tokenizer)
        with pytest.raises(RpcError) as err:
            await collect(pipeline(make_registry(cluster)))
        assert (err.value.code, err.value.message) == (S.INVALID_ARGUMENT, "prefill node prefill-0: prompt too long")
        assert cluster.called("Prefill") == ["prefill-0"]
        assert "decode-0" in cluster.aborts  # its reservation is freed
    run(main())


def test_every_prefill_node_failing_is_unavailable(default_tokenizer):
    async def main():
        down = [rpc_error(S.UNAVAILABLE)]
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[down, down], decode_scripts=[])
        with pytest.raises(RpcError) as err:
            await collect(pipeline(make_registry(cluster)))
        assert (err.value.code, err.value.message) == (S.UNAVAILABLE, "no prefill node is available")
        assert cluster.called("Prefill") == ["prefill-0", "prefill-1"]
        assert set(cluster.aborts) == {"decode-0", "prefill-0", "prefill-1"}
        # every reservation freed, once; no third one once no prefill node is left to try
        assert cluster.aborts.count("decode-0") == len(cluster.called("Reserve")) == 2
    run(main())


def test_no_healthy_prefill_node_reserves_nothing(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[], decode_scripts=[])
        registry = make_registry(cluster)
        for node in registry.by_role("prefill"):
            node.healthy = False
        with pytest.raises(RpcError) as err:
            await collect(pipeline(registry))
        assert (err.value.code, err.value.message) == (S.UNAVAILABLE, "no prefill node is available")
        assert cluster.called("Reserve") == [] and cluster.aborts == []
    run(main())


# ---- decode reservations -----------------------------------------------------------------------

def test_reserve_refused_for_room_falls_back_to_the_next_decode_node(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8, finish=FR.FINISH_REASON_LENGTH)]],
                          reserve_errors={"decode-0": [rpc_error(S.RESOURCE_EXHAUSTED, "no free blocks")]})
        registry = make_registry(cluster, decodes=("decode-0", "decode-1"))
        chunks = await collect(pipeline(registry, max_tokens=2))
        assert [c.token_ids for c in chunks] == [[7], [8]]
        assert cluster.called("Reserve") == ["decode-0", "decode-1"]
        assert cluster.called("Decode") == ["decode-1"]
        target = cluster.requests("Prefill")[0].target
        assert (target.decode_node_id, target.decode_address) == ("decode-1", registry.nodes["decode-1"].address)
        assert cluster.aborts == []  # a refused Reserve holds nothing
    run(main())


def test_reserve_failing_on_a_dead_node_frees_it_and_falls_back(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8, finish=FR.FINISH_REASON_LENGTH)]],
                          reserve_errors={"decode-0": [rpc_error(S.UNAVAILABLE)]})
        registry = make_registry(cluster, decodes=("decode-0", "decode-1"))
        chunks = await collect(pipeline(registry, max_tokens=2))
        assert [c.token_ids for c in chunks] == [[7], [8]]
        assert cluster.called("Reserve") == ["decode-0", "decode-1"]
        assert cluster.aborts == ["decode-0"]  # a late Reserve may still have landed there
    run(main())


def test_a_kv_transfer_longer_than_the_first_token_budget_is_waited_for(default_tokenizer):
    """Issue 11 item 5: the router does not time out a decode stream whose KV is still moving (its
    nodes bound a stalled transfer); the budget for the first decode event starts once it landed."""
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer,
                          prefill_scripts=[[first_token(), Slow(1.5, transfer_done())]],
                          decode_scripts=[[Slow(1.7, tokens(8)), tokens(9, finish=FR.FINISH_REASON_LENGTH)]])
        pipe = pipeline(make_registry(cluster), max_tokens=3, kv_wait_ms=200, token_gap_s=0.3)  # 0.5 s budget
        chunks = await collect(pipe)
        assert [c.token_ids for c in chunks] == [[7], [8], [9]]
        assert cluster.called("Prefill") == ["prefill-0"] and cluster.called("Decode") == ["decode-0"]  # no retry
    run(main())


def test_a_silent_decode_node_after_the_kv_landed_is_retried(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer,
                          prefill_scripts=[[first_token(), transfer_done()], [first_token(), transfer_done()]],
                          decode_scripts=[[HANG], [tokens(8), tokens(9, finish=FR.FINISH_REASON_LENGTH)]])
        pipe = pipeline(make_registry(cluster, decodes=("decode-0", "decode-1")), max_tokens=3, kv_wait_ms=200,
                        token_gap_s=0.3)
        chunks = await collect(pipe)
        assert [c.token_ids for c in chunks] == [[7], [8], [9]]
        assert len(cluster.called("Decode")) == 2  # the first decode node sent nothing within its budget
    run(main())


def test_no_decode_node_with_room_is_resource_exhausted_after_the_admission_wait(default_tokenizer):
    async def main():
        full = [rpc_error(S.RESOURCE_EXHAUSTED)] * 100
        cluster = Cluster(
            [], [], reserve_errors={"decode-0": list(full), "decode-1": list(full)},
            tokenizer=default_tokenizer)
        registry = make_registry(cluster, decodes=("decode-0", "decode-1"))
        with pytest.raises(RpcError) as err:
            await collect(pipeline(registry, admission_wait_s=0.3))
        assert err.value.code == S.RESOURCE_EXHAUSTED
        assert err.value.message == "no decode node can admit 5 prompt + 4 new tokens (1 KV blocks) now; retry later"
        assert set(cluster.called("Reserve")) == {"decode-0", "decode-1"} and not cluster.called("Prefill")
    run(main())


def test_no_healthy_decode_node_is_unavailable(default_tokenizer):
    async def main():
        cluster = Cluster([], [], tokenizer=default_tokenizer)
        registry = make_registry(cluster, decodes=("decode-0",))
        registry.nodes["decode-0"].healthy = False
        with pytest.raises(RpcError) as err:
            await collect(pipeline(registry, admission_wait_s=0.2))
        assert (err.value.code, err.value.message) == (S.UNAVAILABLE, "no decode node is available")
        assert cluster.log == []
    run(main())


def test_reserve_refused_as_bad_input_is_forwarded(default_tokenizer):
    async def main():
        cluster = Cluster(
            [], [], reserve_errors={"decode-0": [rpc_error(S.INVALID_ARGUMENT, "num_prompt_tokens")]},
            tokenizer=default_tokenizer)
        with pytest.raises(RpcError) as err:
            await collect(pipeline(make_registry(cluster)))
        assert (err.value.code, err.value.message) == (S.INVALID_ARGUMENT, "decode node decode-0: num_prompt_tokens")
    run(main())


# ---- local prefill -------------------------------------------------------------------------------

def test_a_short_uncached_prompt_is_prefilled_on_the_decode_node(default_tokenizer):
    async def main():
        cluster = Cluster(
            prefill_scripts=[], decode_scripts=[[tokens(7), tokens(8, finish=FR.FINISH_REASON_LENGTH)]],
            tokenizer=default_tokenizer)
        placement = Placement(16, local_prefill_tokens=len(PROMPT))
        pipe = pipeline(make_registry(cluster), max_tokens=2, placement=placement)
        chunks = await collect(pipe)
        assert [c.token_ids for c in chunks] == [[7], [8]]
        assert cluster.called("Decode") == ["decode-0"] and not cluster.called("Prefill")
        assert not cluster.called("Reserve")
        request = cluster.requests("Decode")[0]
        assert request.local_prefill and list(request.prompt_token_ids) == PROMPT
        assert list(request.output_token_ids) == []
        assert placement.stats.prefills_skipped == 1
        assert (pipe.timings.prefill_node, pipe.timings.decode_node) == ("decode-0", "decode-0")
    run(main())


def test_a_prompt_longer_than_the_local_threshold_goes_to_the_prefill_pool(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8, finish=FR.FINISH_REASON_LENGTH)]])
        placement = Placement(16, local_prefill_tokens=len(PROMPT) - 1)
        await collect(pipeline(make_registry(cluster), max_tokens=2, placement=placement))
        assert cluster.called("Prefill") == ["prefill-0"] and placement.stats.prefills_skipped == 0
    run(main())


def test_prompt_logprobs_always_use_the_prefill_pool(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8, finish=FR.FINISH_REASON_LENGTH)]])
        params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
        placement = Placement(16, local_prefill_tokens=64)
        await collect(pipeline(make_registry(cluster), max_tokens=2, params=params,
                               placement=placement))
        assert cluster.called("Prefill") == ["prefill-0"]
    run(main())


def test_colocated_decode_failing_mid_stream_resumes_on_another_node(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[], decode_scripts=[
            [tokens(7), tokens(8), rpc_error(S.UNAVAILABLE, "node died")],
            [tokens(9), tokens(10, finish=FR.FINISH_REASON_LENGTH)]])
        registry = make_registry(cluster, prefills=(), decodes=("decode-0", "decode-1"))
        pipe = pipeline(registry, max_tokens=4)
        chunks = await collect(pipe)
        assert [c.token_ids for c in chunks] == [[7], [8], [9], [10]]
        assert cluster.called("Decode") == ["decode-0", "decode-1"]
        assert list(cluster.requests("Decode")[1].output_token_ids) == [7, 8]  # resumed, not restarted
        await asyncio.sleep(0.01)  # the abort of the failed node runs in the background
        assert cluster.aborts == ["decode-0"] and pipe.placement.stats.failovers == 1
    run(main())


def test_colocated_decode_failing_past_max_failovers_is_unavailable(default_tokenizer):
    async def main():
        cluster = Cluster(
            prefill_scripts=[], decode_scripts=[[tokens(7), rpc_error(S.UNAVAILABLE)]],
            tokenizer=default_tokenizer)
        registry = make_registry(cluster, prefills=(), decodes=("decode-0", "decode-1"))
        with pytest.raises(RpcError) as err:
            await collect(pipeline(registry, max_failovers=0))
        assert (err.value.code, err.value.message) == (
            S.UNAVAILABLE, "decode node decode-0 failed mid-stream; 1 tokens were sent")
    run(main())


# ---- how a stream ends ---------------------------------------------------------------------------

def _disaggregated(tokenizer, last_event, params=None, max_tokens=8):
    cluster = Cluster(tokenizer=tokenizer, prefill_scripts=[[first_token(HELLO), transfer_done()]],
                      decode_scripts=[[tokens(WORLD), last_event]], first_token_id=HELLO)
    return cluster, collect(pipeline(make_registry(cluster), max_tokens=max_tokens, params=params))


def test_finish_length_relays_every_token_and_its_text(default_tokenizer):
    async def main():
        _, chunks = _disaggregated(default_tokenizer, tokens(DOT, finish=FR.FINISH_REASON_LENGTH), max_tokens=3)
        chunks = await chunks
        assert [c.token_ids for c in chunks] == [[HELLO], [WORLD], [DOT]]
        assert [c.text for c in chunks] == [" Hello", " world", "."]
        assert [c.finish_reason for c in chunks] == [0, 0, FR.FINISH_REASON_LENGTH]
        assert [c.completion_tokens for c in chunks] == [1, 2, 3]
        assert chunks[-1].timings is not None and chunks[-1].timings.e2e_ms > 0
        assert (chunks[-1].stop_sequence, chunks[-1].stop_token_id) == ("", None)
    run(main())


def test_finish_eos_adds_no_text(default_tokenizer):
    async def main():
        _, chunks = _disaggregated(default_tokenizer, tokens(EOS, finish=FR.FINISH_REASON_EOS))
        chunks = await chunks
        assert (chunks[-1].token_ids, chunks[-1].text, chunks[-1].finish_reason) == ([EOS], "", FR.FINISH_REASON_EOS)
        assert chunks[-1].stop_token_id is None
        assert "".join(c.text for c in chunks) == " Hello world"
    run(main())


@pytest.mark.parametrize("include", [False, True])
def test_finish_on_a_stop_token_id(default_tokenizer, include):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[DOT], include_stop_str_in_output=include)
        _, chunks = _disaggregated(default_tokenizer, tokens(DOT, finish=FR.FINISH_REASON_STOP, stop_token_id=DOT),
                                   params=params)
        chunks = await chunks
        last = chunks[-1]
        assert (last.finish_reason, last.stop_token_id, last.stop_sequence) == (FR.FINISH_REASON_STOP, DOT, "")
        assert last.text == ("." if include else "")
    run(main())


def test_finish_on_a_stop_string_never_streams_it(default_tokenizer):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=8, stop=[" world"])
        _, chunks = _disaggregated(default_tokenizer, tokens(DOT), params=params)
        chunks = await chunks  # the node finds the stop string in " world": DOT is never read
        assert [c.token_ids for c in chunks] == [[HELLO], [WORLD]]
        assert "".join(c.text for c in chunks) == " Hello"
        assert (chunks[-1].finish_reason, chunks[-1].stop_sequence) == (FR.FINISH_REASON_STOP, " world")
    run(main())


def test_finish_stop_reported_by_the_node_keeps_its_stop_sequence(default_tokenizer):
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=8, stop=["."])
        _, chunks = _disaggregated(default_tokenizer, tokens(DOT, finish=FR.FINISH_REASON_STOP, stop_sequence="."),
                                   params=params)
        chunks = await chunks
        assert "".join(c.text for c in chunks) == " Hello world"
        assert (chunks[-1].finish_reason, chunks[-1].stop_sequence, chunks[-1].stop_token_id) == (
            FR.FINISH_REASON_STOP, ".", None)
    run(main())


def test_a_first_token_that_finishes_frees_the_reservation(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer,
                          prefill_scripts=[[first_token(HELLO, finish_reason=FR.FINISH_REASON_LENGTH)]],
                          decode_scripts=[], first_token_id=HELLO)
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=1))
        assert [(c.token_ids, c.text, c.finish_reason) for c in chunks] == [([HELLO], " Hello",
                                                                            FR.FINISH_REASON_LENGTH)]
        assert not cluster.called("Decode") and cluster.aborts == ["decode-0"]
    run(main())


# ---- text and finish: the node's, relayed as sent --------------------------------------------------

def test_the_nodes_text_and_finish_are_relayed_verbatim():
    """No tokenizer behind the fakes: the text is not what the ids decode to, and the router
    passes it on as sent (it never detokenizes)."""
    async def main():
        cluster = Cluster(prefill_scripts=[[first_token(HELLO, text="A"), transfer_done()]],
                          decode_scripts=[[tokens(WORLD, text=""), tokens(DOT, text="bc"),
                                           tokens(THE, finish=FR.FINISH_REASON_STOP, text="d", stop_token_id=END)]],
                          first_token_id=HELLO)
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=8))
        assert [(c.token_ids, c.text) for c in chunks] == [([HELLO], "A"), ([WORLD], ""), ([DOT], "bc"),
                                                           ([THE], "d")]
        assert [c.finish_reason for c in chunks] == [0, 0, 0, FR.FINISH_REASON_STOP]
        assert (chunks[-1].stop_token_id, chunks[-1].stop_sequence) == (END, "")
        assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4]
    run(main())


def test_a_stop_token_id_on_the_first_token_is_relayed():
    async def main():
        stop = first_token(DOT, finish_reason=FR.FINISH_REASON_STOP, stop_token_id=DOT)
        cluster = Cluster(prefill_scripts=[[stop]], decode_scripts=[], first_token_id=DOT)
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=8))
        assert [(c.text, c.finish_reason, c.stop_token_id) for c in chunks] == [("", FR.FINISH_REASON_STOP, DOT)]
    run(main())


def test_a_character_split_across_tokens_is_sent_whole(default_tokenizer):
    async def main():
        cluster = Cluster(prefill_scripts=[[first_token(LLAMA[0]), transfer_done()]],
                          decode_scripts=[[tokens(LLAMA[1]), tokens(LLAMA[2]),
                                           tokens(DOT, finish=FR.FINISH_REASON_LENGTH)]],
                          first_token_id=LLAMA[0], tokenizer=default_tokenizer)
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=4))
        assert [c.text for c in chunks] == [" ", "", "\U0001f999", "."]
        assert "".join(c.text for c in chunks) == default_tokenizer.decode(LLAMA + [DOT])
    run(main())


def test_a_retry_after_the_first_token_sends_its_text_once(default_tokenizer):
    """The decode node of the fresh attempt starts from the first token the client has (its text
    replayed, not streamed again): its deltas continue the text exactly, across a split character."""
    async def main():
        cluster = Cluster(prefill_scripts=[[first_token(LLAMA[0]), transfer_done()],
                                           [first_token(LLAMA[0]), transfer_done()]],
                          decode_scripts=[[rpc_error(S.NOT_FOUND, "unknown or expired reservation")],
                                          [tokens(LLAMA[1]), tokens(LLAMA[2]),
                                           tokens(DOT, finish=FR.FINISH_REASON_LENGTH)]],
                          first_token_id=LLAMA[0], tokenizer=default_tokenizer)
        chunks = await collect(pipeline(make_registry(cluster), max_tokens=4))
        assert len(cluster.called("Prefill")) == 2
        assert [c.token_ids for c in chunks] == [[LLAMA[0]], [LLAMA[1]], [LLAMA[2]], [DOT]]
        assert "".join(c.text for c in chunks) == " \U0001f999."
    run(main())


def test_a_failover_resumes_the_text_where_the_client_is(default_tokenizer):
    async def main():
        cluster = Cluster(prefill_scripts=[], decode_scripts=[
            [tokens(HELLO), tokens(LLAMA[0]), rpc_error(S.UNAVAILABLE, "node died")],
            [tokens(LLAMA[1]), tokens(LLAMA[2], finish=FR.FINISH_REASON_LENGTH)]], tokenizer=default_tokenizer)
        registry = make_registry(cluster, prefills=(), decodes=("decode-0", "decode-1"))
        chunks = await collect(pipeline(registry, max_tokens=4))
        assert [c.text for c in chunks] == [" Hello", " ", "", "\U0001f999"]
    run(main())


def test_an_early_end_releases_the_text_the_node_held_back(default_tokenizer):
    """Text that might start a stop string is held back by the node; when the router ends the
    completion itself (time limit, abort) it sends what the last event said was held."""
    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=8, stop=[" world!"])
        cluster = Cluster(prefill_scripts=[[first_token(HELLO), transfer_done()]],
                          decode_scripts=[[tokens(WORLD), HANG]], first_token_id=HELLO, tokenizer=default_tokenizer)
        pipe = pipeline(make_registry(cluster), params=params)
        got = await _cancel_after(pipe, 2)
        last = pipe.final_chunk(FR.FINISH_REASON_TIME_LIMIT)
        assert "".join(c.text for c in got) + last.text == " Hello world"
        assert last.text and last.finish_reason == FR.FINISH_REASON_TIME_LIMIT
    run(main())


async def _cancel_after(pipe, count: int) -> list:
    """Runs the pipeline until it relayed `count` chunks, then cancels it (as the router does at a
    time limit or a client's abort); returns the chunks."""
    got = []

    async def consume():
        async for chunk in pipe.run():
            got.append(chunk)

    task = asyncio.get_running_loop().create_task(consume())
    while len(got) < count:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return got


# ---- aborts ------------------------------------------------------------------------------------

def test_a_cancelled_completion_aborts_every_node_holding_it(default_tokenizer):
    async def main():
        cluster = Cluster(
            prefill_scripts=[[first_token(), transfer_done()]], decode_scripts=[[tokens(8), HANG]],
            tokenizer=default_tokenizer)
        pipe = pipeline(make_registry(cluster), max_tokens=8)
        got = await _cancel_after(pipe, 2)
        assert [c.token_ids for c in got] == [[7], [8]]
        assert sorted(cluster.aborts) == ["decode-0", "prefill-0"]
        assert all(call.cancelled for call in cluster.calls)
        last = pipe.final_chunk(FR.FINISH_REASON_ABORTED)  # what the router sends the client then
        assert (last.finish_reason, last.completion_tokens, pipe.finished) == (FR.FINISH_REASON_ABORTED, 2, True)
    run(main())


def test_a_cancelled_local_completion_aborts_its_decode_node(default_tokenizer):
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[], decode_scripts=[[tokens(7), HANG]])
        pipe = pipeline(make_registry(cluster, prefills=()), max_tokens=8)
        task = asyncio.get_running_loop().create_task(collect(pipe))
        while not pipe.num_tokens:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cluster.aborts == ["decode-0"] and cluster.calls[0].cancelled
        assert pipe.registry.nodes["decode-0"].active == 0
    run(main())


def test_closing_the_stream_early_frees_both_nodes_at_once(default_tokenizer):
    """A consumer that stops reading and closes the stream (aclose) runs the pipeline's cleanup
    there and then, not when the generator is collected."""
    async def main():
        cluster = Cluster(tokenizer=default_tokenizer, prefill_scripts=[[first_token(), transfer_done()]],
                          decode_scripts=[[tokens(8), HANG]])
        stream = pipeline(make_registry(cluster), max_tokens=8).run()
        first = await asyncio.wait_for(anext(stream), 5)
        assert first.token_ids
        await asyncio.wait_for(stream.aclose(), 5)
        assert "decode-0" in cluster.aborts and all(call.cancelled for call in cluster.calls)
    run(main())
