import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import engine.sampler as sampler_module
from engine.sampler import RowSpec, Sampler, SamplingMetadata, make_generator
from engine.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 50


def rows_of(*params, prompt=(1, 2, 3), output=(), eos=(0,)):
    return [RowSpec(p, list(prompt), list(output), list(eos)) for p in params]


def sample(logits, rows, device="cpu"):
    meta = SamplingMetadata.build(rows, logits.shape[1], device)
    return Sampler()(logits.to(device), meta)


def processed(logits, rows):
    meta = SamplingMetadata.build(rows, logits.shape[1], "cpu")
    return Sampler().process_logits(logits, meta)


def random_logits(batch, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_does_not_depend_on_the_batch(device):
    logits = random_logits(4)
    a, b, c, d = (SamplingParams(seed=7), SamplingParams(), SamplingParams(seed=9, top_k=10),
                  SamplingParams(temperature=0))
    alone = sample(logits[:1], rows_of(a), device).sampled_token_ids.item()
    full = sample(logits, rows_of(a, b, c, d), device).sampled_token_ids
    reordered = sample(logits[[3, 2, 1, 0]], rows_of(d, c, b, a), device).sampled_token_ids
    assert full[0].item() == alone == reordered[3].item()
    assert full[2].item() == reordered[1].item()
    assert full[3].item() == reordered[0].item() == logits[3].argmax().item()


def test_seeded_stream_follows_seed_and_step():
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    def token(seed, step):
        out = sample(logits, rows_of(SamplingParams(seed=seed), output=[5] * step))
        return out.sampled_token_ids.item()
    steps = [token(123, s) for s in range(20)]
    assert steps == [token(123, s) for s in range(20)]
    assert len(set(steps)) > 10  # a new draw each step
    assert [token(124, s) for s in range(20)] != steps
    g1, g2 = make_generator(5, 3, "cpu"), make_generator(5, 3, "cpu")
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))
    assert not torch.equal(torch.rand(8, generator=make_generator(5, 3, "cpu", index=1)),
                           torch.rand(8, generator=make_generator(5, 3, "cpu")))
    # The n completions of one seeded request differ from each other.
    p = SamplingParams(seed=123)
    siblings = [RowSpec(p, [1], [], [0], index=i) for i in range(4)]
    meta = SamplingMetadata.build(siblings, 1000, "cpu")
    tokens = Sampler()(torch.zeros(4, 1000), meta).sampled_token_ids.tolist()
    assert tokens[0] == steps[0] and len(set(tokens)) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_and_tiny_temperature_equal_greedy(device):
    logits = random_logits(64)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie: greedy takes the first
    greedy = logits.argmax(dim=-1)
    assert greedy[0] == 3
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1),
                   SamplingParams(top_k=1, temperature=2.0, seed=1),
                   SamplingParams(temperature=1e-6)):
        out = sample(logits, rows_of(*[params] * 64), device)
        assert torch.equal(out.sampled_token_ids.cpu(), greedy), params
    # Small but non-greedy temperature: logits 0.5 apart become e^-500 apart.
    sep = torch.arange(V, dtype=torch.float32).repeat(64, 1) * 0.5
    sep = sep[:, torch.randperm(V, generator=torch.Generator().manual_seed(1))]
    out = sample(sep, rows_of(*[SamplingParams(temperature=1e-3)] * 64), device)
    assert torch.equal(out.sampled_token_ids.cpu(), sep.argmax(dim=-1))


def test_mixed_greedy_and_random_rows():
    logits = random_logits(200)
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams() for i in range(200)]
    out = sample(logits, rows_of(*params)).sampled_token_ids
    assert torch.equal(out[1::2], logits[1::2].argmax(dim=-1))
    assert (out[0::2] != logits[0::2].argmax(dim=-1)).any()  # the random rows do vary


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def support_and_freqs(params, n=20000):
    logits = PROBS.log().repeat(n, 1)
    tokens = sample(logits, rows_of(*[params] * n)).sampled_token_ids
    counts = torch.bincount(tokens, minlength=len(PROBS)).float() / n
    return set(tokens.tolist()), counts


def test_plain_sampling_follows_the_distribution():
    support, freqs = support_and_freqs(SamplingParams())
    assert support == set(range(6))
    assert torch.allclose(freqs, PROBS, atol=0.015), freqs


def test_temperature_reshapes_the_distribution():
    _, freqs = support_and_freqs(SamplingParams(temperature=0.5))
    expected = PROBS**2 / (PROBS**2).sum()
    assert torch.allclose(freqs, expected, atol=0.015), freqs


@pytest.mark.parametrize("params,support", [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.6), {0, 1}),  # 0.4 < 0.6 <= 0.65
    (SamplingParams(top_p=0.7), {0, 1, 2}),
    (SamplingParams(top_p=0.01), {0}),
    (SamplingParams(min_p=0.3), {0, 1, 2}),  # keeps p >= 0.12
    (SamplingParams(min_p=0.5), {0, 1}),
    (SamplingParams(top_k=4, top_p=0.95, min_p=0.2), {0, 1, 2, 3}),
    (SamplingParams(top_k=4, top_p=0.75), {0, 1, 2}),
])
def test_truncation_restricts_the_support(params, support):
    got, freqs = support_and_freqs(params)
    assert got == support
    kept = torch.tensor(sorted(support))
    expected = PROBS[kept] / PROBS[kept].sum()  # renormalised over what is kept
    assert torch.allclose(freqs[kept], expected, atol=0.015), freqs


@pytest.mark.parametrize("top_p", [1.0, 0.99])  # top_k alone, or sorted with top_p
def test_truncation_is_per_row(top_p):
    n = 4000
    params = [SamplingParams(top_k=i % 4, top_p=top_p) for i in range(n)]  # 0 = off
    tokens = sample(PROBS.log().repeat(n, 1), rows_of(*params)).sampled_token_ids
    for k in (1, 2, 3):
        assert set(tokens[k::4].tolist()) == set(range(k))
    assert set(tokens[0::4].tolist()) == set(range(len(PROBS)))


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = processed(logits, rows_of(params, prompt=[0], output=[1, 1, 3]))
    # repetition over prompt + output: 2 -> 1, -1 -> -2, 3 -> 1.5; then the output counts:
    # token 1 (twice): -2 - 2 * 0.25 - 0.5; token 3 (once): 1.5 - 0.25 - 0.5.
    assert torch.equal(got, torch.tensor([[1.0, -3.0, 0.5, 0.75, 0.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]]))  # input untouched


def test_repetition_penalty_matches_hf():
    logits = random_logits(3, vocab=200)
    prompts = [[5, 6, 7, 7], [10], [150, 3, 199, 0]]
    outputs = [[8, 5], [11, 12, 13, 10], []]
    penalty = 1.3
    rows = [RowSpec(SamplingParams(repetition_penalty=penalty), p, o, [0])
            for p, o in zip(prompts, outputs)]
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    # HF sees prompt + output as input_ids; pad by repeating a row's first id (a no-op).
    input_ids = torch.tensor([(p + o + [(p + o)[0]] * width)[:width]
                              for p, o in zip(prompts, outputs)])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    assert torch.allclose(processed(logits, rows), expected, rtol=0, atol=1e-6)


def test_neutral_penalties_leave_other_rows_exact():
    logits = random_logits(2)
    rows = rows_of(SamplingParams(), SamplingParams(frequency_penalty=1.0), output=[1, 2, 2])
    got = processed(logits, rows)
    assert torch.equal(got[0], logits[0])
    assert got[1, 2] == logits[1, 2] - 2.0 and got[1, 1] == logits[1, 1] - 1.0


def test_logit_bias():
    logits = random_logits(2)
    top = logits.argmax(dim=-1)
    rows = rows_of(SamplingParams(temperature=0, logit_bias={7: 100.0}),
                   SamplingParams(temperature=0, logit_bias={top[1].item(): -100.0, 3: 0.5}))
    got = processed(logits, rows)
    assert got[0, 7] == logits[0, 7] + 100.0
    assert got[1, 3] == logits[1, 3] + 0.5
    changed = (got != logits).nonzero().tolist()
    assert changed == sorted([[0, 7], [1, 3], [1, top[1].item()]])
    tokens = sample(logits, rows).sampled_token_ids
    assert tokens[0] == 7 and tokens[1] != top[1]


def test_min_tokens_suppresses_eos_and_stop_token_ids():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # eos would win
    logits[:, 9] = 9.0  # then a stop token
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9])
    rows = [RowSpec(p, [1], [4], [2]),  # 1 < 3 outputs: both forbidden
            RowSpec(p, [1], [4, 4, 4], [2]),  # min_tokens reached
            RowSpec(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9],
                                   ignore_eos=True), [1], [], [2])]
    got = processed(logits, rows)
    assert got[0, 2] == got[0, 9] == float("-inf")
    assert not torch.isinf(got[1]).any()
    assert got[2, 9] == float("-inf") and got[2, 2] == 10.0
    assert sample(logits, rows).sampled_token_ids.tolist() == [0, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_are_raw_log_softmax(dtype):
    logits = random_logits(4).to(dtype)
    params = [SamplingParams(logprobs=5, temperature=0.7, top_k=3, repetition_penalty=1.5,
                             logit_bias={1: 5.0}),
              SamplingParams(logprobs=0),
              SamplingParams(logprobs=2, temperature=0, presence_penalty=1.0),
              SamplingParams()]
    out = sample(logits, rows_of(*params, output=[1, 2]))
    raw = torch.log_softmax(logits.float(), dim=-1)
    expected_chosen = raw.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    assert torch.equal(out.logprobs, expected_chosen)
    assert out.top_logprobs.shape == out.top_logprob_ids.shape == (4, 5)
    for row in range(4):
        ids, values = out.top_logprob_ids[row], out.top_logprobs[row]
        assert torch.equal(values, raw[row, ids])
        assert (values[:-1] >= values[1:]).all()  # best first
        assert values[0] == raw[row].max() and values[-1] == raw[row].topk(5).values[-1]


def test_no_logprobs_unless_asked():
    out = sample(random_logits(2), rows_of(SamplingParams(), SamplingParams(temperature=0)))
    assert out.logprobs is None and out.top_logprobs is None and out.top_logprob_ids is None
    out = sample(random_logits(2), rows_of(SamplingParams(logprobs=0), SamplingParams()))
    assert out.logprobs.shape == (2,) and out.top_logprobs is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_and_inf_logits_never_break_sampling(device, temperature):
    logits = random_logits(4)
    logits[0, ::2] = float("nan")  # NaN counts as -inf: never chosen
    logits[1] = float("nan")  # nothing usable: some valid id, no error
    logits[2, 5] = float("inf")  # +inf wins
    logits[3] = float("-inf")
    logits[3, 11] = float("nan")
    params = SamplingParams(temperature=temperature, top_p=0.9, logprobs=2)
    for _ in range(20):
        out = sample(logits, rows_of(*[params] * 4), device)
        tokens = out.sampled_token_ids.cpu()
        assert tokens[0] % 2 == 1
        assert 0 <= tokens[1] < V and 0 <= tokens[3] < V
        assert tokens[2] == 5
        assert not torch.isnan(out.logprobs).any() and not torch.isnan(out.top_logprobs).any()


def test_all_greedy_path_does_not_sort(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the all-greedy path must not sort or draw noise")
    monkeypatch.setattr(sampler_module, "_apply_top_k_top_p", forbidden)
    monkeypatch.setattr(sampler_module, "_exponential", forbidden)
    logits = random_logits(8)
    rows = rows_of(*[SamplingParams(temperature=0, top_k=5, top_p=0.5)] * 8)
    out = sample(logits, rows)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_build_metadata():
    rows = [RowSpec(SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=3), [1, 2, 3],
                    [4], [0]),
            RowSpec(SamplingParams(seed=5, top_k=-1, top_p=0.5, logit_bias={3: 1.0}), [7], [],
                    [0])]
    meta = SamplingMetadata.build(rows, V, "cpu")
    assert not meta.all_greedy and not meta.all_random and not meta.no_penalties
    assert meta.no_top_k and not meta.no_top_p and meta.no_min_p
    assert meta.prompt_token_ids.tolist() == [[1, 2, 3], [7, V, V]]
    assert meta.output_token_ids.tolist() == [[4], [V]]
    assert meta.logit_bias == [None, {3: 1.0}]
    assert meta.min_tokens_mask is None and meta.max_num_logprobs == 3
    assert meta.generators[0] is None and meta.generators[1] is not None
    plain = SamplingMetadata.build(rows_of(SamplingParams()), V, "cpu")
    assert plain.no_penalties and plain.prompt_token_ids is None and plain.output_token_ids is None
    assert plain.logit_bias is None and plain.max_num_logprobs is None and plain.all_random


def test_out_of_range_ids_in_metadata_are_ignored():
    # Defence in depth: ids past the vocabulary (verify() rejects them earlier) are no-ops.
    logits = random_logits(1)
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={V + 5: 50.0},
                       min_tokens=5, stop_token_ids=[V + 1])
    got = processed(logits, [RowSpec(p, [V + 3, -1], [10**6], [V])])
    assert torch.equal(got, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 49152, 997])  # grouped (small batches), grouped, prime: plain
def test_greedy_fast_path_matches_general_argmax(dtype, vocab):
    """The all-greedy path (argmax in the logits' dtype, no fp32 copy, no sync) picks what the
    general path picks, NaN / inf / all -inf rows included."""
    from engine.sampler import _greedy, _safe_argmax

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, vocab, generator=g).to(dtype)
    x[3, 5] = float("nan")
    x[4] = float("-inf")
    x[5] = float("nan")
    x[6, 7] = float("inf")
    x[7] = float("-inf")
    x[7, 9] = float("nan")
    x[8, 10] = x[8, 900] = x[8].max() + 1  # a tie across groups: the first index wins in both
    x[9, 600] = x[9, 601] = x[9].max() + 1  # a tie inside a group
    ref = _safe_argmax(x.float(), x.float())
    assert ref[8] == 10 and ref[9] == 600
    assert torch.equal(_greedy(x), ref)  # 64 rows: one reduction per row
    assert torch.equal(_greedy(x[:10]), ref[:10])  # few rows: two-stage when the vocabulary allows
    rows = [RowSpec(SamplingParams(temperature=0.0), [1], [])] * 64
    assert torch.equal(Sampler()(x, SamplingMetadata.build(rows, vocab, "cpu")).sampled_token_ids, ref)
