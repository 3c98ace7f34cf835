"""engine/sampling_proto.py: one table maps every SamplingParams field to the public request and to
the nodes' ResolvedParams, in both directions."""
from __future__ import annotations

import dataclasses

import pytest

from engine import sampling_proto as sp
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredSpec
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import node_pb2

DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
FULL = SamplingParams(temperature=0.75, top_p=0.5, top_k=7, min_p=0.25, seed=123, repetition_penalty=1.5,
                      presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={5: 2.0, 9: -1.5}, max_tokens=33,
                      min_tokens=4, stop=["ab", "\n"], stop_token_ids=[3, 8], include_stop_str_in_output=True,
                      ignore_eos=True, logprobs=3, prompt_logprobs=2, skip_special_tokens=False,
                      structured=StructuredSpec("regex", "[ab]+"))  # floats exact in float32, as on the wire


def _fields(params: SamplingParams) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)}


def test_every_sampling_field_has_a_row():
    # n travels on its own (the request's n; always 1 between nodes); spaces_between_special_tokens
    # has no proto field: it keeps its default across processes.
    mapped = {f.attr for f in sp.FIELDS} | {"n", "spaces_between_special_tokens"}
    assert mapped == {f.name for f in dataclasses.fields(SamplingParams)}
    for f in sp.FIELDS:
        assert f.name in pb.GenerateRequest.DESCRIPTOR.fields_by_name or \
            f.name in getattr(pb, {"sampling": "SamplingParameters", "stopping": "StoppingCriteria"}[f.part]).DESCRIPTOR.fields_by_name
        assert f.resolved in node_pb2.ResolvedParams.DESCRIPTOR.fields_by_name


def test_resolved_round_trip_keeps_every_value():
    back, index = sp.from_resolved(sp.to_resolved(FULL, sample_index=5))
    assert index == 5
    assert _fields(back) == _fields(FULL)


def test_resolved_wire_meanings():
    msg = sp.to_resolved(SamplingParams(top_k=-1, max_tokens=None))
    assert msg.top_k == 0 and msg.max_tokens == 0  # off and "up to the context limit"
    assert not msg.HasField("seed") and not msg.HasField("logprobs") and not msg.HasField("structured")
    back, _ = sp.from_resolved(msg)
    assert back.max_tokens is None and back.top_k == 0 and back.seed is None and not back.stop
    with pytest.raises(ValueError, match="n == 1"):
        sp.to_resolved(SamplingParams(n=2))


def test_request_round_trip_keeps_every_value():
    given = {**_fields(FULL), "n": 3}
    back = sp.from_request(sp.write_given(given, pb.GenerateRequest()), DEFAULTS)
    assert _fields(back) == _fields(dataclasses.replace(FULL, n=3))


def test_unset_request_fields_take_the_model_defaults():
    params = sp.from_request(pb.GenerateRequest(), DEFAULTS)
    for name, value in DEFAULTS.items():
        assert getattr(params, name) == pytest.approx(value)
    assert (params.n, params.max_tokens, params.seed, params.presence_penalty, params.skip_special_tokens) == \
        (1, None, None, 0.0, True)
    assert params.logprobs is None and params.prompt_logprobs is None and params.structured is None


def test_write_given_leaves_out_what_the_client_did_not_give():
    request = sp.write_given({"temperature": 0.3, "top_p": None, "max_tokens": None, "skip_special_tokens": True},
                             pb.GenerateRequest())
    assert [f.name for f, _ in request.sampling.ListFields()] == ["temperature"]
    assert not request.stopping.HasField("max_new_tokens") and not request.HasField("logprobs")
    assert request.skip_special_tokens and request.n == 0  # n unset: 1 at the router
    assert sp.from_request(request, DEFAULTS).top_p == pytest.approx(DEFAULTS["top_p"])


def test_write_given_normalises_as_sampling_params_does():
    request = sp.write_given({"stop": "ab", "top_k": -1}, pb.GenerateRequest())
    assert list(request.stopping.stop) == ["ab"]
    assert request.sampling.HasField("top_k") and request.sampling.top_k == 0  # given: off, not the default


@pytest.mark.parametrize("given, message", [
    ({"max_tokens": -1}, "max_tokens must be in [0, 4294967295] (uint32), got -1"),
    ({"max_tokens": 2**63}, "max_tokens must be in [0, 4294967295] (uint32)"),
    ({"n": 0}, "n must be in [1, 4294967295] (uint32), got 0"),  # 0 on the wire is "unset"
    ({"top_k": 2**31}, "top_k must be in [-2147483648, 2147483647] (int32)"),
    ({"seed": -1}, "seed must be in [0, 18446744073709551615] (uint64)"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids must hold values in [0, 4294967295] (uint32), got -1"),
    ({"logit_bias": {-5: 1.0}}, "logit_bias keys must be in [0, 4294967295] (uint32), got -5"),
    ({"logit_bias": {5: 1e300}}, "logit_bias values must be in [-3.4028235e+38, 3.4028235e+38] (float32)"),
    ({"temperature": 1e39}, "temperature must be in [-3.4028235e+38, 3.4028235e+38] (float32), got 1e+39"),
])
def test_write_given_refuses_what_the_wire_cannot_hold(given, message):
    with pytest.raises(ValueError) as err:
        sp.write_given(given, pb.GenerateRequest())
    assert message in str(err.value)


@pytest.mark.parametrize("given, refused", [
    ({"top_p": 1.0000000001}, "top_p"), ({"min_p": 1.0000000001}, "min_p"),
    ({"temperature": -1e-50}, "temperature"), ({"presence_penalty": 2.0000000001}, "presence_penalty"),
    ({"frequency_penalty": -2.0000000001}, "frequency_penalty"), ({"logit_bias": {5: 100.0000000001}}, "logit_bias"),
    ({"top_p": 1e-50}, "top_p"), ({"repetition_penalty": 1e-50}, "repetition_penalty"),  # 0 on the wire, as before
])
def test_float32_rounding_never_makes_a_bad_value_good(given, refused):
    request = sp.write_given(given, pb.GenerateRequest())
    with pytest.raises(ValueError, match=refused):
        sp.from_request(request, DEFAULTS)


def test_float32_rounding_keeps_good_values():
    request = sp.write_given({"top_p": 0.9999999999, "temperature": 1e-50, "presence_penalty": 2.0,
                              "logit_bias": {5: 99.99999999}}, pb.GenerateRequest())
    params = sp.from_request(request, DEFAULTS)  # each stays on its side of the nearest integer
    assert params.top_p == pytest.approx(1.0) and params.top_p < 1.0 and params.logit_bias[5] < 100.0
    assert params.temperature == 0.0 and params.presence_penalty == 2.0  # underflow to 0; exact


def test_bad_values_and_specs_are_value_errors():
    with pytest.raises(ValueError, match="temperature"):
        sp.from_request(pb.GenerateRequest(sampling=pb.SamplingParameters(temperature=-1)), DEFAULTS)
    bad = pb.GenerateRequest(structured=pb.StructuredOutput(json_schema="{not json"))
    with pytest.raises(ValueError):
        sp.from_request(bad, DEFAULTS)  # parsed where the request enters
