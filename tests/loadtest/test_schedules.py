"""Workloads, bursts and arrival schedules: reproducible from a seed, and checked on input."""
from __future__ import annotations

import json
import statistics

import pytest

from loadtest import workload as wl
from loadtest.arrivals import Arrivals, parse_rates, send_times


def test_arrival_times_reproducible_from_seed():
    poisson = Arrivals("poisson", rate=50.0)
    a, b, c = send_times(poisson, 400, 1), send_times(poisson, 400, 1), send_times(poisson, 400, 2)
    assert a == b and a != c and a[0] == 0.0 and a == sorted(a)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.15)  # mean of 399 exponentials
    assert send_times(Arrivals("constant", rate=4.0), 4, 0) == [0.0, 0.25, 0.5, 0.75]
    assert send_times(Arrivals("concurrency", 8), 10, 0) is None
    assert parse_rates("1, 2.5,4") == (1.0, 2.5, 4.0)
    with pytest.raises(ValueError, match="rate"):
        Arrivals("poisson", rate=0)
    with pytest.raises(ValueError):
        parse_rates("1,-2")


def test_workload_and_bursts_reproducible_from_seed():
    cfg = wl.WorkloadConfig(input_len=wl.LengthDist.parse("lognormal:64,0.5", 8, 200),
                            output_len=wl.LengthDist.parse("uniform:4-12"), vocab_size=5000, seed=11,
                            bursts=(wl.Burst.parse("at=2,count=3,len=700,out=5"),))
    first, again = wl.build(cfg, 50), wl.build(cfg, 50)
    other = wl.build(wl.WorkloadConfig(**{**cfg.__dict__, "seed": 12}), 50)
    assert first == again and first != other
    main, bursts = first[:50], first[50:]
    assert all(s.kind == "main" and 8 <= s.prompt.num_tokens <= 200 and 4 <= s.max_tokens <= 12 for s in main)
    assert all(len(s.prompt.ids) == s.prompt.num_tokens and 1000 <= min(s.prompt.ids) and max(s.prompt.ids) < 5000
               for s in main)
    assert [(s.kind, s.at, s.prompt.num_tokens, s.max_tokens) for s in bursts] == [("burst", 2.0, 700, 5)] * 3
    assert len({s.prompt.ids for s in bursts}) == 3  # distinct prompts, no prefix-cache shortcut
    warm = wl.warmup(cfg, 2)
    assert [(s.kind, s.prompt.num_tokens <= 200) for s in warm[:2]] == [("warmup", True)] * 2
    assert (warm[2].prompt.num_tokens, len(warm)) == (700, 3)  # one prompt of the burst length
    assert all(warm[2].prompt.ids[:16] != b.prompt.ids[:16] for b in bursts)  # no prefix-cache hit later


def test_length_distributions():
    import random

    rng = random.Random(0)
    assert wl.LengthDist.parse("128").sample(rng) == 128
    normal = [wl.LengthDist.parse("normal:100,10", 90, 105).sample(rng) for _ in range(500)]
    assert min(normal) == 90 and max(normal) == 105
    assert 95 < statistics.mean(normal) < 101
    lognormal = [wl.LengthDist.parse("lognormal:50,0.3").sample(rng) for _ in range(500)]
    assert 45 <= statistics.median(lognormal) <= 55
    for bad in ("gamma:3", "uniform:10-5", "normal:100", "fixed:x"):
        with pytest.raises(ValueError):
            wl.LengthDist.parse(bad)
    with pytest.raises(ValueError, match="count"):
        wl.Burst.parse("at=1,len=5")


def test_shared_prefix_and_text():
    cfg = wl.WorkloadConfig(kind="shared-prefix", input_len=wl.LengthDist.parse("8"), num_prefixes=2, prefix_len=32,
                            vocab_size=4000, seed=5)
    specs = wl.build(cfg, 6)
    prefixes = [s.prompt.ids[:32] for s in specs]
    assert prefixes[0] == prefixes[2] == prefixes[4] != prefixes[1] == prefixes[3]
    assert all(s.prompt.num_tokens == 40 == len(s.prompt.ids) for s in specs)
    text = wl.build(wl.WorkloadConfig(**{**cfg.__dict__, "text": True}), 4)
    assert text[0].prompt.system == text[2].prompt.system and len(text[0].prompt.system.split()) == 32
    assert len(text[1].prompt.text.split()) == 8


def test_sharegpt_file(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "a b c d e f"}]},
            {"conversations": [{"from": "gpt", "value": "no human first"}]},
            {"conversations": [{"from": "human", "value": " ".join(["w"] * 50)}, {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    cfg = wl.WorkloadConfig(kind="sharegpt", dataset=str(path), input_len=wl.LengthDist.parse("1", 1, 10),
                            output_len=wl.LengthDist.parse("1", 1, 100))
    specs = wl.build(cfg, 3)
    assert [(s.prompt.text, s.max_tokens) for s in specs] == [("one two three", 8)] * 3  # 6 words x 4/3
    with pytest.raises(ValueError, match="dataset"):
        wl.WorkloadConfig(kind="sharegpt")
