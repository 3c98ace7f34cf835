"""What to send: prompts and output lengths, seeded so one seed gives one workload.

    random        token ids (or words) with fixed / uniform / normal / lognormal lengths
    sharegpt      a ShareGPT-format JSON file given by path (first human turn, first reply length)
    shared-prefix N system prompts of L tokens, each request one of them + its own random suffix
    bursts        k prompts of L tokens injected at given times on top of any workload

A prompt is a list of token ids (the gRPC API and /v1/completions take them as they are) or text
made of common English words, about one token each (what chat endpoints need).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

WORDS = tuple((
    "the of and to in is was that for on as with by he at from his an were are which this be or has had "
    "not but what all when there can more one would if so about out up them some could into then time "
    "like see other than now only its over also after first new way may water long little very just "
    "where most know good much well back through year right think still man say too old same tell boy "
    "follow came want show around form three small set put end does another large must big even such "
    "turn here why ask went men read need land different home move try kind hand picture again change "
    "off play spell air away animal house point page letter mother answer found study learn should "
    "world high every near add food between own below country plant last school father keep tree never "
    "start city earth eye light thought head under story saw left few while along might close something "
    "seem next hard open example begin life always those both paper together got group often run").split())

DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """A token count: fixed:N, uniform:LO-HI, normal:MEAN,STD or lognormal:MEDIAN,SIGMA, clamped to [lo, hi]."""
    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 30

    def __post_init__(self):
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"length distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.kind!r}")
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"length bounds must satisfy 1 <= min <= max, got min {self.lo}, max {self.hi}")
        if self.a <= 0 or self.b < 0 or (self.kind == "uniform" and self.b < self.a):
            raise ValueError(f"bad {self.kind} length parameters {self.a}, {self.b}")

    @classmethod
    def parse(cls, spec: str, lo: int | None = None, hi: int | None = None) -> LengthDist:
        kind, _, params = spec.partition(":")
        if not params and kind.isdigit():
            kind, params = "fixed", kind
        sep = "-" if kind == "uniform" else ","
        try:
            values = [float(v) for v in params.split(sep)] if params else []
        except ValueError:
            raise ValueError(f"cannot read length {spec!r}: numbers expected after '{kind}:'") from None
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}.get(kind, 0)
        if len(values) != arity:
            raise ValueError(f"length {spec!r}: expected fixed:N, uniform:LO-HI, normal:MEAN,STD or "
                             "lognormal:MEDIAN,SIGMA")
        return cls(kind, *values, lo=lo or 1, hi=hi or 1 << 30)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        elif self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:
            value = self.a * math.exp(rng.gauss(0.0, self.b))
        return min(max(round(value), self.lo), self.hi)


@dataclass(frozen=True)
class Prompt:
    """One request's input: token ids, text, or chat messages (system + user), and its size in tokens
    (exact for ids; for text the number of words, which the server's count replaces)."""
    ids: tuple[int, ...] | None = None
    text: str | None = None
    system: str | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class RequestSpec:
    prompt: Prompt
    max_tokens: int
    kind: str = "main"       # "main", "burst" or "warmup"
    at: float | None = None  # seconds after the run's start (bursts); None = when the arrival process says


@dataclass(frozen=True)
class Burst:
    """`count` prompts of `length` tokens arriving together `at` seconds into the run."""
    at: float
    count: int
    length: int
    max_tokens: int = 16

    @classmethod
    def parse(cls, spec: str) -> Burst:
        """at=2.0,count=8,len=7000[,out=16]"""
        fields = {}
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            if not eq or key not in ("at", "count", "len", "out"):
                raise ValueError(f"burst {spec!r}: expected at=SECONDS,count=K,len=TOKENS[,out=TOKENS]")
            fields[key] = value
        if not {"at", "count", "len"} <= fields.keys():
            raise ValueError(f"burst {spec!r}: at=, count= and len= are required")
        burst = cls(float(fields["at"]), int(fields["count"]), int(fields["len"]), int(fields.get("out", 16)))
        if burst.at < 0 or burst.count < 1 or burst.length < 1 or burst.max_tokens < 1:
            raise ValueError(f"burst {spec!r}: at >= 0, count, len and out >= 1")
        return burst


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "random"                   # random | sharegpt | shared-prefix
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 128)
    vocab_size: int = 32000                # random token ids are drawn from [low_id, vocab_size)
    low_id: int = 1000
    text: bool = False                     # words instead of token ids
    dataset: str | None = None             # sharegpt: path to the JSON file
    num_prefixes: int = 4                  # shared-prefix: N system prompts ...
    prefix_len: int = 512                  # ... of L tokens each
    bursts: tuple[Burst, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.kind not in GENERATORS:
            raise ValueError(f"workload must be one of {', '.join(GENERATORS)}, got {self.kind!r}")
        if self.kind == "sharegpt" and not self.dataset:
            raise ValueError("the sharegpt workload needs --dataset PATH (a ShareGPT-format JSON file)")
        if not 0 <= self.low_id < self.vocab_size:
            raise ValueError(f"token ids must come from [low_id, vocab_size): got [{self.low_id}, {self.vocab_size})")


@dataclass
class _Draw:
    config: WorkloadConfig
    rng: random.Random = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(self.config.seed)

    def tokens(self, n: int) -> Prompt:
        if self.config.text:
            return Prompt(text=" ".join(self.rng.choice(WORDS) for _ in range(n)), num_tokens=n)
        ids = tuple(self.rng.randrange(self.config.low_id, self.config.vocab_size) for _ in range(n))
        return Prompt(ids=ids, num_tokens=n)


def _random(draw: _Draw, n: int) -> list[RequestSpec]:
    cfg = draw.config
    return [RequestSpec(draw.tokens(cfg.input_len.sample(draw.rng)), cfg.output_len.sample(draw.rng))
            for _ in range(n)]


def _shared_prefix(draw: _Draw, n: int) -> list[RequestSpec]:
    cfg = draw.config
    prefixes = [draw.tokens(cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    specs = []
    for i in range(n):
        prefix, suffix = prefixes[i % cfg.num_prefixes], draw.tokens(cfg.input_len.sample(draw.rng))
        if cfg.text:
            prompt = Prompt(text=suffix.text, system=prefix.text, num_tokens=prefix.num_tokens + suffix.num_tokens)
        else:
            prompt = Prompt(ids=prefix.ids + suffix.ids, num_tokens=prefix.num_tokens + suffix.num_tokens)
        specs.append(RequestSpec(prompt, cfg.output_len.sample(draw.rng)))
    return specs


def _conversations(path: str) -> list[tuple[str, str]]:
    """(first human turn, first reply) of each ShareGPT entry that has both."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} entries")
    pairs = []
    for entry in data:
        turns = (entry.get("conversations") or entry.get("conversation") or []) if isinstance(entry, dict) else []
        values = [(t.get("from") or t.get("role"), t.get("value") or t.get("content") or "") for t in turns
                  if isinstance(t, dict)]
        for (who, text), (_, reply) in zip(values, values[1:]):
            if who in ("human", "user") and text.strip() and reply.strip():
                pairs.append((text, reply))
                break
    if not pairs:
        raise ValueError(f"{path}: no entry with a human turn followed by a reply")
    return pairs


def _sharegpt(draw: _Draw, n: int) -> list[RequestSpec]:
    """Prompts in file order (shuffled by the seed); output length = the reply's words x 4/3,
    clamped by the output length's min/max; entries outside the input min/max are skipped."""
    cfg = draw.config
    pairs = _conversations(cfg.dataset)
    draw.rng.shuffle(pairs)
    specs = []
    for text, reply in pairs:
        words = len(text.split())
        if cfg.input_len.lo <= words <= cfg.input_len.hi:
            out = min(max(round(len(reply.split()) * 4 / 3), cfg.output_len.lo), cfg.output_len.hi)
            specs.append(RequestSpec(Prompt(text=text, num_tokens=words), out))
    if not specs:
        raise ValueError(f"{cfg.dataset}: no prompt within the input length bounds")
    return [specs[i % len(specs)] for i in range(n)]


GENERATORS = {"random": _random, "sharegpt": _sharegpt, "shared-prefix": _shared_prefix}


def build(config: WorkloadConfig, num_requests: int) -> list[RequestSpec]:
    """`num_requests` main requests, then every burst's requests (kind "burst", with their times)."""
    draw = _Draw(config)
    specs = GENERATORS[config.kind](draw, num_requests)
    for burst in config.bursts:
        specs += [RequestSpec(draw.tokens(burst.length), burst.max_tokens, kind="burst", at=burst.at)
                  for _ in range(burst.count)]
    return specs


def warmup(config: WorkloadConfig, count: int, max_tokens: int = 8) -> list[RequestSpec]:
    """`count` short requests of the workload's shape, then one prompt of each burst length (so no
    kernel is compiled for a long prompt inside the measured run); excluded from the figures."""
    draw = _Draw(WorkloadConfig(**{**config.__dict__, "seed": config.seed + 7919, "bursts": ()}))
    specs = [RequestSpec(draw.tokens(min(config.input_len.sample(draw.rng), 256)), max_tokens, kind="warmup")
             for _ in range(count)]
    lengths = sorted({b.length for b in config.bursts}) if count else []
    return specs + [RequestSpec(draw.tokens(n), 2, kind="warmup") for n in lengths]
