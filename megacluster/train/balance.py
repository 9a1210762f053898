"""Per-rank batch shares from measured compute throughput. Pure Python: this module never imports torch.

On a mixed fleet (say an H100 next to an A100) an equal split makes the fast GPU wait for the slow one at every
all-reduce. `Balancer` measures each rank's throughput (samples per second of forward+backward, timed before the
all-reduce) and hands out the global batch in proportion to it, so every rank finishes its share at about the
same time. The global batch, and so the optimisation, is unchanged: only who computes which samples moves.

Use (every rank runs the same code on the same all-gathered numbers, so every rank gets the same shares):

    bal = Balancer(world=4, global_batch=256)
    for step in ...:
        share = bal.shares()[rank]; start = offsets(bal.shares())[rank]   # this rank's slice of the global batch
        for mb in micro_batches(share, micro_batch=8): ...                 # forward+backward, timed -> compute_s
        all_compute_s, all_samples = all_gather(compute_s, share)
        bal.observe(all_compute_s, all_samples)                          # True when shares changed
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from megacluster.errors import InputError

MODES = ("auto", "equal")
# Probes (see Balancer): estimates with unchanged shares before the first probe, and the most a failed probe's
# back-off may wait; a probe is tried only when the first rank to finish took < PROBE_GAP x the last one's time.
PROBE_WAIT = 4
PROBE_MAX_WAIT = 64
PROBE_GAP = 0.95


def _check_int(name: str, value: object, *, minimum: int) -> int:
    """`value` as an int >= minimum, else InputError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def split(global_batch: int, weights: Sequence[float]) -> list[int]:
    """Integer shares summing exactly to `global_batch`, proportional to `weights`.

    Largest-remainder method in exact rational arithmetic: every rank gets floor(exact share), the samples left
    over go one each to the ranks with the largest fractional parts, ties to the lower rank. So each share is
    within 1 of its exact proportion, a larger weight never gets a smaller share, a weight of 0 gets 0, and the
    result depends only on the inputs (same on every rank and every machine).
    Raises InputError if global_batch < 0, weights is empty, any weight is negative or not finite, or all are 0.
    """
    _check_int("global_batch", global_batch, minimum=0)
    exact_weights = [_weight(i, w) for i, w in enumerate(weights)]
    if not exact_weights:
        raise InputError("weights must name at least one rank, got []")
    total = sum(exact_weights)
    if total == 0:
        raise InputError("weights are all 0: at least one rank must have a positive weight")
    quotas = [global_batch * w / total for w in exact_weights]  # exact samples per rank (Fractions)
    shares = [math.floor(q) for q in quotas]
    left = global_batch - sum(shares)  # < number of ranks with a fractional part, by construction
    by_remainder = sorted(range(len(quotas)), key=lambda r: (-(quotas[r] - shares[r]), r))
    for rank in by_remainder[:left]:
        shares[rank] += 1
    return shares


def fastest_split(global_batch: int, throughputs: Sequence[float]) -> list[int]:
    """Integer shares summing to `global_batch` that minimise the step time max_i(share_i / throughput_i).

    Every rank first gets floor(exact proportional share); each sample left over then goes to the rank that
    would finish it soonest, (share + 1) / throughput, ties to the lower rank. This differs from `split` only in
    where the left-over samples go, and matters when the batch is small: throughputs 1 and 4 samples/s with 8
    samples give 1 + 7 (step 1.75 s), where largest remainder gives 2 + 6 (2 s).
    Exact rational arithmetic: the same result on every rank. Errors as for `split`.
    """
    split(global_batch, throughputs)  # validates the inputs, with split's messages
    rates = [_weight(i, t) for i, t in enumerate(throughputs)]
    quotas = [global_batch * r / sum(rates) for r in rates]
    shares = [math.floor(q) for q in quotas]
    for _ in range(global_batch - sum(shares)):
        rank = min((r for r in range(len(rates)) if rates[r] > 0), key=lambda r: ((shares[r] + 1) / rates[r], r))
        shares[rank] += 1
    return shares


def _weight(rank: int, w: float) -> Fraction:
    """A weight as an exact Fraction (floats convert exactly), validated."""
    if isinstance(w, bool) or not isinstance(w, (int, float, Fraction)) or not math.isfinite(w) or w < 0:
        raise InputError(f"weights[{rank}] must be a finite number >= 0, got {w!r}")
    return Fraction(w)


def offsets(shares: Sequence[int]) -> list[int]:
    """Start index of each rank's contiguous slice of the global batch: offsets([3, 5, 0, 2]) == [0, 3, 8, 8]."""
    starts, at = [], 0
    for rank, share in enumerate(shares):
        _check_int(f"shares[{rank}]", share, minimum=0)
        starts.append(at)
        at += share
    return starts


def micro_batches(share: int, micro_batch: int) -> list[int]:
    """Split a rank's share into chunks of at most `micro_batch` samples, the last one possibly smaller.

    micro_batches(10, 4) == [4, 4, 2]; micro_batches(0, 4) == []. Gradients are accumulated over the chunks.
    """
    _check_int("share", share, minimum=0)
    _check_int("micro_batch", micro_batch, minimum=1)
    full, rest = divmod(share, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


@dataclass(kw_only=True, slots=True)
class Balancer:
    """Shares of the global batch per rank, re-estimated from measured throughput.

    Modes (`balance` in the config):
      - "equal": shares are always the equal split (largest remainder, ties to the lower ranks).
      - "auto":  equal until the first estimate, then proportional to each rank's throughput EMA, re-estimated
        every `every` observed steps. A rank never drops to 0 samples while global_batch >= world, so it keeps
        being measured and can earn its share back; dropping a rank altogether is the supervisor's call (resize).

    Throughput of a rank = samples / compute seconds of one step, smoothed by an exponential moving average with
    weight `ema` on the newest measurement. A step where a rank processed 0 samples or reported 0 s leaves its
    estimate as it was.

    Probes. Shares in proportion to samples/s equalise the ranks' times only if time grows in proportion to the
    share. A step also has fixed costs; where they dominate (a small share on a GPU, where launches do), a rank
    whose share was cut measures few samples/s *because* its share is small, and keeps it: a passing slowdown left
    2 ranks at 15/1 for good, 21% slower a step than 8/8 (benchmarks/stragglers.py, "recover"). So when the shares
    have not moved (by more than a sample a rank) for PROBE_WAIT estimates and the first rank to finish took <
    PROBE_GAP x the time of the last, one sample moves from the last to the first, and the next estimate keeps the
    move if the step (its slowest rank's share / samples/s) got faster or the first rank is still clearly not the
    slowest (`_judge_probe`), and tries the next one; otherwise it puts the shares back and waits twice as long
    before the next probe (at most PROBE_MAX_WAIT estimates; a kept probe resets the wait). What a probe
    decides is measured, not modelled, so it holds for any fixed cost; a failed probe costs `every` steps at a
    split one sample worse.

    Stragglers, checked at every estimate: a rank slower than it was, by more than its peers slowed. Its ratio is
    throughput / the rank's baseline, where the baseline is its EMA at the last estimate at which it was not low (so
    a rank that halves its speed stays low, it does not become its own new normal). It is low when the ratio is <
    straggler_ratio x the median ratio of the other measured ranks (capped at 1; with no other rank, 1): when every
    rank slows together (a loaded host, a slow shared file system) none holds the others back, and none is named. A
    slowdown of most of the ranks at once reads the same way. Samples/s depend on the share (a step has fixed costs,
    which a smaller share spreads over fewer samples), so when the rank's share changed since the last estimate, its
    baseline is scaled by the ratio of its throughput now to then, as far as a share change explains it: by a factor
    between 1 (no fixed cost) and the ratio of the shares (all fixed cost). So a share cut alone makes no straggler,
    a rank that was low stays low, and one that slowed while its share moved is still found. A GPU slower than its
    peers from the start is not a straggler: it simply gets a smaller share.
    A rank low at `patience` consecutive estimates is flagged; one estimate at normal speed clears the flag.
    The trainer measures (and calls `observe`) only in "auto" mode: timing the compute needs a device sync per
    step on a GPU, which the default "equal" mode does not pay, so there no rank is measured or named.
    """

    world: int  # ranks
    global_batch: int  # samples per optimizer step, over all ranks
    mode: str = "auto"  # "auto" | "equal"
    every: int = 5  # observed steps between estimates
    ema: float = 0.5  # weight of the newest throughput measurement, in (0, 1]
    straggler_ratio: float = 0.8  # fraction of the expected throughput below which a rank is "low", in (0, 1]
    patience: int = 2  # consecutive low estimates before a rank is flagged

    _throughput: list[float | None] = field(default_factory=list, init=False, repr=False)  # samples/s EMA
    _baseline: list[float | None] = field(default_factory=list, init=False, repr=False)  # samples/s
    _low: list[int] = field(default_factory=list, init=False, repr=False)  # consecutive low estimates
    _judged: list[tuple[int, float] | None] = field(default_factory=list, init=False, repr=False)  # (share,
    # samples/s) at the last estimate
    _shares: list[int] = field(default_factory=list, init=False, repr=False)  # samples per rank
    _observed: int = field(default=0, init=False, repr=False)  # steps observed since the last estimate
    _still: int = field(default=0, init=False, repr=False)  # estimates since the shares last moved
    _wait: int = field(default=PROBE_WAIT, init=False, repr=False)  # still estimates before the next probe
    _probe: tuple[list[int], float] | None = field(default=None, init=False, repr=False)  # (shares, step s) before
    # the probe now being measured

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"balance must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_int("world", self.world, minimum=1)
        _check_int("global_batch", self.global_batch, minimum=0)
        _check_int("balance.every", self.every, minimum=1)
        _check_int("balance.patience", self.patience, minimum=1)
        for name, value in (("balance.ema", self.ema), ("balance.straggler_ratio", self.straggler_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
        self._reset(self.world)

    def _reset(self, world: int) -> None:
        """Forget every estimate; equal shares for `world` ranks."""
        self.world = world
        self._throughput = [None] * world
        self._baseline = [None] * world
        self._low = [0] * world
        self._judged = [None] * world
        self._observed = 0
        self._still, self._wait, self._probe = 0, PROBE_WAIT, None
        self._shares = split(self.global_batch, [1] * world)

    def shares(self) -> list[int]:
        """Samples per rank for the next step (a copy; sums to global_batch)."""
        return list(self._shares)

    def throughputs(self) -> list[float]:
        """Per-rank throughput EMA in samples/s; 0.0 for a rank not measured yet."""
        return [t or 0.0 for t in self._throughput]

    def stragglers(self) -> list[int]:
        """Ranks currently flagged as stragglers, ascending; none in "equal" mode, which measures nothing (flags
        restored from an "auto" run's checkpoint would otherwise stand for good, never re-checked)."""
        if self.mode != "auto":
            return []
        return [r for r, n in enumerate(self._low) if n >= self.patience]

    def observe(self, compute_s: Sequence[float], samples: Sequence[int]) -> bool:
        """Record one step: per-rank compute seconds (forward+backward, before the all-reduce) and samples.

        Every `every` calls it re-estimates: updates the straggler flags and, in "auto" mode, the shares.
        Returns True if the shares changed (the caller re-slices the global batch from the next step on).
        """
        if len(compute_s) != self.world or len(samples) != self.world:
            raise ValueError(
                f"observe needs one value per rank (world={self.world}), "
                f"got {len(compute_s)} compute_s and {len(samples)} samples"
            )
        for rank, (seconds, n) in enumerate(zip(compute_s, samples)):
            self._measure(rank, seconds, n)
        self._observed += 1
        if self._observed < self.every:
            return False
        self._observed = 0
        self._update_stragglers()
        if self.mode != "auto":
            return False
        if self._probe is not None:
            return self._judge_probe()
        shares = self._proportional_shares()
        if self._moved(shares):
            self._still = 0
            return self._set_shares(shares)
        # unchanged, or moved by one sample a rank at most: noise's jitter, which would otherwise keep probes off
        # for good (5% noise moved 4 ranks' 21/21/21 by a sample most estimates: a 21/1/21/21 split stood for
        # 500 steps before a probe could start; benchmarks/stragglers.py, "recover" with sigma)
        changed = self._set_shares(shares)
        self._still += 1
        return (self._still >= self._wait and self._try_probe()) or changed

    def _moved(self, shares: list[int]) -> bool:
        """Whether `shares` differ from the current ones by more than a sample on some rank (noise moves one)."""
        return max(abs(a - b) for a, b in zip(shares, self._shares)) > 1

    def _step_s(self) -> tuple[dict[int, float], float]:
        """Each measured rank's compute seconds at its share (share / samples/s), and the slowest one's."""
        times = {r: n / t for r, (n, t) in enumerate(zip(self._shares, self._throughput)) if n and t}
        return times, max(times.values(), default=0.0)

    def _try_probe(self) -> bool:
        """Move one sample from the rank that finishes last to the one that finishes first (class docstring)."""
        self._still = 0
        times, slowest = self._step_s()
        if len(times) < 2:
            return False
        last = max(times, key=lambda r: (times[r], -r))
        first = min(times, key=lambda r: (times[r], r))
        if times[first] >= PROBE_GAP * slowest or self._shares[last] <= 1:
            return False
        self._probe = (list(self._shares), slowest)
        shares = list(self._shares)
        shares[last] -= 1
        shares[first] += 1
        return self._set_shares(shares)

    def _judge_probe(self) -> bool:
        """Keep the probe's shares if its step was faster, or if the rank given the sample still takes < PROBE_GAP x
        the old step (and probe on at once), else restore them and back off. The second test is the one noise
        cannot fool: the donor only got faster and the others did not change (checked first: if proportional
        shares now differ by more than a sample, a speed moved and they are taken instead), so the step can only
        have got slower through the receiver; the first alone, one sample's gain against step-to-step noise, kept
        4 ranks at 21/1/21/21 through 5,000 steps of 5% noise (benchmarks/stragglers.py, "recover" with sigma)."""
        before, slowest = self._probe
        self._probe = None
        shares = self._proportional_shares()
        if self._moved(shares):  # a speed moved meanwhile, beyond the
            # probe's sample: re-split in proportion at once, as an estimate without a probe would (a rank slowed
            # mid-probe was otherwise cut one sample an estimate by the chain of kept probes: a review)
            self._still = 0
            return self._set_shares(shares)
        times, now = self._step_s()
        receiver = max(range(self.world), key=lambda r: self._shares[r] - before[r])
        if now < slowest or times.get(receiver, math.inf) < PROBE_GAP * slowest:
            self._wait = PROBE_WAIT
            return self._try_probe()
        self._wait = min(2 * self._wait, PROBE_MAX_WAIT)
        self._still = 0
        return self._set_shares(before)

    def _measure(self, rank: int, seconds: float, n: int) -> None:
        """Fold one measurement (n samples in `seconds`) into rank's throughput EMA."""
        if not seconds >= 0 or n < 0:
            raise ValueError(f"rank {rank}: compute_s must be >= 0 and samples >= 0, got {seconds!r}, {n!r}")
        if n == 0 or seconds == 0:
            return  # nothing measured: keep the old estimate
        now = n / seconds  # samples/s
        old = self._throughput[rank]
        self._throughput[rank] = now if old is None else self.ema * now + (1 - self.ema) * old

    def _update_stragglers(self) -> None:
        """One straggler check per estimate (see the class docstring)."""
        ratios: dict[int, float] = {}  # rank -> throughput now / its baseline
        for rank, now in enumerate(self._throughput):
            if now is None:
                continue
            base, share, judged = self._baseline[rank], self._shares[rank], self._judged[rank]
            if base is not None and judged is not None and judged[0] != share and judged[0] and share:
                # the same speed at another share: samples/s move with the share by a factor between 1 (no fixed
                # cost) and the share ratio (all fixed cost); a larger move is the rank's own speed changing
                lo, hi = sorted((1.0, share / judged[0]))
                base = self._baseline[rank] = base * min(max(now / judged[1], lo), hi)
            self._judged[rank] = (share, now)
            ratios[rank] = 1.0 if base is None else now / base
        for rank, ratio in ratios.items():
            # slower than it was by more than its peers slowed: when all slow together, none holds the others back
            peers = [r for other, r in ratios.items() if other != rank]
            norm = min(statistics.median(peers), 1.0) if peers else 1.0
            low = ratio < self.straggler_ratio * norm
            self._low[rank] = self._low[rank] + 1 if low else 0
            if not low:
                self._baseline[rank] = self._throughput[rank]

    def _proportional_shares(self) -> list[int]:
        """Shares proportional to throughput; unmeasured ranks count as the median; >= 1 each if possible."""
        known = [t for t in self._throughput if t is not None]
        if not known:
            return split(self.global_batch, [1] * self.world)
        median = statistics.median(known)
        shares = fastest_split(self.global_batch, [median if t is None else t for t in self._throughput])
        return _at_least_one(shares) if self.global_batch >= self.world else shares

    def _set_shares(self, shares: list[int]) -> bool:
        changed = shares != self._shares
        self._shares = shares
        return changed

    def resize(self, world: int, *, keep: Sequence[int] | None = None) -> None:
        """The world changed (a rank left, or joined). Shares are recomputed for the new world at once.

        keep: for each new rank in order, the old rank index whose estimates it inherits, e.g. world 4 -> 3 after
        old rank 1 died: resize(3, keep=[0, 2, 3]). Growing: resize(5, keep=[0, 1, 2, 3]) -> new rank 4 starts
        unmeasured (it counts as the median until measured). Without keep every estimate is reset (equal shares).
        """
        _check_int("world", world, minimum=1)
        if keep is None:
            self._reset(world)
            return
        self._check_keep(world, keep)
        old = (self._throughput, self._baseline, self._low, self._judged)
        self._reset(world)
        for new, previous in enumerate(keep):
            self._throughput[new] = old[0][previous]
            self._baseline[new] = old[1][previous]
            self._low[new] = old[2][previous]
            self._judged[new] = old[3][previous]
        if self.mode == "auto":
            self._shares = self._proportional_shares()

    def _check_keep(self, world: int, keep: Sequence[int], old_world: int | None = None) -> None:
        old_world = self.world if old_world is None else old_world
        if len(keep) > world or len(set(keep)) != len(keep):
            raise ValueError(f"keep must list at most {world} distinct old ranks, got {list(keep)}")
        for previous in keep:
            if isinstance(previous, bool) or not isinstance(previous, int) or not 0 <= previous < old_world:
                raise ValueError(f"keep: {previous!r} is not a rank of the old world of {old_world}")

    def state_dict(self) -> dict:
        """The measured state as a JSON-able dict (settings such as mode and every come from the config)."""
        return {
            "version": 1,
            "world": self.world,
            "global_batch": self.global_batch,
            "mode": self.mode,
            "throughput": list(self._throughput),
            "baseline": list(self._baseline),
            "low": list(self._low),
            "judged": [list(j) if j else None for j in self._judged],
            "shares": list(self._shares),
            "observed": self._observed,
            "still": self._still,
            "wait": self._wait,
            "probe": [self._probe[0], self._probe[1]] if self._probe else None,
        }

    def load_state_dict(self, d: dict, *, keep: Sequence[int] | None = None) -> None:
        """Restore what state_dict() returned, for this Balancer's world (the world it was built with wins).

        Same world: an exact restore (the stored shares are reused when global_batch and mode still match, else
        recomputed from the estimates). Different world (the run shrank or grew across the restart): the saved
        estimates are mapped as in resize(self.world, keep=keep); without keep they are dropped (equal shares).
        """
        if d.get("version") != 1:
            raise ValueError(f"unknown Balancer state version {d.get('version')!r}")
        world, saved = self.world, _check_int("world", d["world"], minimum=1)
        lists = [list(d[k]) for k in ("throughput", "baseline", "low", "shares")]
        judged = [tuple(j) if j else None for j in d.get("judged") or [None] * saved]  # absent: older state
        if any(len(x) != saved for x in [*lists, judged]):
            raise ValueError(f"Balancer state lists must have world={saved} entries")
        probe = d.get("probe")  # absent (with still and wait): an older state, from before probes
        if probe and (len(probe[0]) != saved or sum(probe[0]) != d["global_batch"] or min(probe[0]) < 0):
            raise ValueError(f"Balancer state: the probe's shares {probe[0]} are not a split of global_batch="
                             f"{d['global_batch']} over world={saved}")
        probing = (int(d.get("still", 0)), int(d.get("wait", PROBE_WAIT)),
                   (list(probe[0]), float(probe[1])) if probe else None)
        if saved != world and keep is not None:
            self._check_keep(world, keep, old_world=saved)  # before anything changes: a refused load changes nothing
        self.world = saved
        self._throughput, self._baseline, self._low, shares = lists
        self._judged = judged
        self._observed = int(d["observed"])
        self._still, self._wait, self._probe = 0, PROBE_WAIT, None  # kept only with the stored shares
        if saved != world:
            self.resize(world, keep=keep)
        elif d["global_batch"] == self.global_batch and d["mode"] == self.mode:
            self._shares = shares
            self._still, self._wait, self._probe = probing
        elif self.mode == "auto":
            self._shares = self._proportional_shares()
        else:
            self._shares = split(self.global_batch, [1] * world)


def _at_least_one(shares: list[int]) -> list[int]:
    """Give every rank at least 1 sample, taken from the largest share (ties: lowest rank). Sum unchanged."""
    shares = list(shares)
    for rank, share in enumerate(shares):
        if share == 0:
            donor = max(range(len(shares)), key=lambda r: (shares[r], -r))
            shares[donor] -= 1
            shares[rank] = 1
    return shares
