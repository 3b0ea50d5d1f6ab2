"""Where one call spends its time: shares of torch.profiler's self CPU time by groups of ops."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def self_time_shares(fn: Callable[[], object], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Run ``fn`` once under torch.profiler; for each group (a name -> profiler event keys such as
    ``"aten::mm"`` or an autograd Function's name), its share of the self CPU time, and
    ``"other"`` for the rest. Shares are rounded to 3 decimals."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    self_us: dict[str, float] = {}
    for event in prof.key_averages():
        self_us[event.key] = self_us.get(event.key, 0.0) + event.self_cpu_time_total
    total = sum(self_us.values()) or 1.0
    raw = {name: sum(self_us.get(key, 0.0) for key in keys) / total for name, keys in groups.items()}
    return {**{name: round(value, 3) for name, value in raw.items()}, "other": round(1 - sum(raw.values()), 3)}
