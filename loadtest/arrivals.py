"""When to send: a closed loop of concurrent clients, or open-loop Poisson / constant-rate send
times (seeded), and the rates of a sweep."""
from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("concurrency", "poisson", "constant")


@dataclass(frozen=True)
class Arrivals:
    kind: str = "concurrency"
    concurrency: int = 8   # closed loop: the number of clients; open loop: most requests in flight (0 = no cap)
    rate: float = 0.0      # open loop: requests per second

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"arrivals must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "concurrency" and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1 in a closed loop, got {self.concurrency}")
        if self.kind != "concurrency" and self.rate <= 0:
            raise ValueError(f"{self.kind} arrivals need --rate > 0 (requests per second), got {self.rate}")
        if self.concurrency < 0:
            raise ValueError(f"--concurrency must be >= 0, got {self.concurrency}")

    @property
    def closed(self) -> bool:
        return self.kind == "concurrency"

    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.closed else f"{self.kind} {self.rate:g} req/s"


def send_times(arrivals: Arrivals, n: int, seed: int) -> list[float] | None:
    """Seconds after the start at which each of `n` requests is sent (the first at 0); None for a
    closed loop, where a client sends its next request when the previous one ends."""
    if arrivals.closed:
        return None
    if arrivals.kind == "constant":
        return [i / arrivals.rate for i in range(n)]
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(arrivals.rate)
    return times


def parse_rates(spec: str) -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0): the request rates of a sweep, each > 0."""
    try:
        rates = tuple(float(r) for r in spec.split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--sweep {spec!r}: expected comma-separated request rates, e.g. 1,2,4") from None
    if not rates or min(rates) <= 0:
        raise ValueError(f"--sweep {spec!r}: every rate must be > 0")
    return rates
