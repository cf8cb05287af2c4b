"""What the Redis store keeps: the key layout, and the Lua scripts (every read-modify-write
is one atomic script).

Each script returns the state it found *before* changing anything; the Python side runs the
pure decision function (``checks.greylist.step``, ``checks.ratelimit.decide_all``) on that
state to build the answer. The script applies the very same transition to store the new
state, so the answer and the stored state agree (tests/integration/redis_store checks the
mirror against ``step()`` over generated cases).

Numbers travel as text: ARGV is formatted with Python's ``repr`` (shortest round-trip) and
stored values with ``%.17g``, so every float round-trips bit for bit and the comparisons in
Lua give the same result as in Python. A TTL is ``expiry - now`` in milliseconds (at least
1), relative to the caller's ``now``: the Redis server's clock is never consulted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ..checks.greylist import KEY_SEPARATOR


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (EVALSHA name), computed locally."""

    name: str
    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.body.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)


# Shared helpers prepended to the scripts that write records.
_PUT: Final = """
local now = tonumber(ARGV[1])
local function num(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
-- HSET the fields plus 'x' (absolute expiry, caller's clock); TTL = expiry - now.
local function put(key, expires, ...)
  redis.call('HSET', key, 'x', num(expires), ...)
  redis.call('PEXPIRE', key, math.max(1, math.ceil((expires - now) * 1000)))
end
"""

#: One greylisting question, mirroring ``policyd.checks.greylist.step`` branch by branch.
#:
#: KEYS[1]  triplet hash ``<prefix>:t:{<client>}|<sender>|<recipient>``; fields
#:          f first_seen, l last_seen, p passed ('1'/'0'), a attempts, x expiry
#: KEYS[2]  client hash ``<prefix>:c:{<client>}``; fields n passes, l last_seen, x expiry
#:          (both keys carry the same hash tag: one Cluster slot)
#: ARGV     now, delay, retry_window, max_age (seconds), auto_whitelist_after (0 = off),
#:          force_pass ('1'/'0')
#: Returns  {f, l, p, a, n, l_client} as found before the step (nil where missing)
GREYLIST_STEP: Final = Script(
    "greylist_step",
    _PUT
    + """
local delay, window, max_age = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local auto_after, force = tonumber(ARGV[5]), ARGV[6] == '1'
local t = redis.call('HMGET', KEYS[1], 'f', 'l', 'p', 'a')
local c = redis.call('HMGET', KEYS[2], 'n', 'l')
local found = {t[1], t[2], t[3], t[4], c[1], c[2]}

local passes, client_last = tonumber(c[1]), tonumber(c[2])
local client = passes ~= nil and client_last ~= nil
if client and auto_after > 0 and passes >= auto_after and now - client_last <= max_age then
  put(KEYS[2], now + max_age, 'n', int(passes), 'l', num(now))        -- AUTO
  return found
end
local first, last, attempts = tonumber(t[1]), tonumber(t[2]), tonumber(t[4])
local live = first ~= nil and last ~= nil and attempts ~= nil
local passed = t[3] == '1'
if live and ((not passed and now - first > window) or (passed and now - last > max_age)
             or now < first) then
  live = false
end
if not live and not force then
  put(KEYS[1], now + window, 'f', num(now), 'l', num(now), 'p', '0', 'a', '1')     -- NEW
  return found
end
if live and passed then
  put(KEYS[1], now + max_age, 'f', num(first), 'l', num(now), 'p', '1',
      'a', int(attempts + 1))                                                    -- KNOWN
  return found
end
if not live then first, attempts = now, 0 end
attempts = attempts + 1
if now - first < delay and not force then
  put(KEYS[1], first + window, 'f', num(first), 'l', num(now), 'p', '0',
      'a', int(attempts))                                                        -- EARLY
  return found
end
put(KEYS[1], now + max_age, 'f', num(first), 'l', num(now), 'p', '1', 'a', int(attempts))
local old = 0
if client and now - client_last <= max_age then old = passes end
put(KEYS[2], now + max_age, 'n', int(old + 1), 'l', num(now))                   -- PASSED
return found
""",
)

#: One rate-limit question: GCRA on every charge, all-or-nothing, mirroring
#: ``policyd.checks.ratelimit.gcra`` and ``decide_all``.
#:
#: KEYS     one string per charge ``<prefix>:r:{rate}<rule>|<parts>``: the TAT; TTL = TAT - now
#:          (all rate keys share one hash tag, so a question's keys are in one Cluster slot)
#: ARGV     now, then per charge: cost, interval (period / count), burst, dry_run ('1'/'0')
#: Returns  the TATs found before (nil for a fresh key), in KEYS order
RATELIMIT_STEP: Final = Script(
    "ratelimit_step",
    """
local now = tonumber(ARGV[1])
local found = redis.call('MGET', unpack(KEYS))
local writes = {}
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 4
  local cost, interval, burst = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local tat = tonumber(found[i])
  local base = now
  if tat ~= nil and tat >= now then base = tat end
  local new_tat = base + cost * interval
  local allowed = new_tat <= now + burst * interval + 1e-9
  if not allowed and ARGV[j + 3] ~= '1' then return found end     -- refused: nothing changes
  if allowed then writes[#writes + 1] = {KEYS[i], new_tat} end
end
for _, w in ipairs(writes) do
  redis.call('SET', w[1], string.format('%.17g', w[2]),
             'PX', math.max(1, math.ceil((w[2] - now) * 1000)))
end
return found
""",
)

#: ``policyctl greylist pass``: mark one triplet passed now, creating it when missing.
#:
#: KEYS[1]  triplet hash (as in GREYLIST_STEP)
#: ARGV     now, max_age
#: Returns  1
GREYLIST_PASS: Final = Script(
    "greylist_pass",
    _PUT
    + """
local max_age = tonumber(ARGV[2])
local t = redis.call('HMGET', KEYS[1], 'f', 'a')
local first, attempts = tonumber(t[1]), tonumber(t[2])
if first == nil or attempts == nil then first, attempts = now, 0 end
put(KEYS[1], now + max_age, 'f', num(first), 'l', num(now), 'p', '1', 'a', int(attempts))
return 1
""",
)

SCRIPTS: Final = (GREYLIST_STEP, RATELIMIT_STEP, GREYLIST_PASS)


_TAG_ESCAPES: Final = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})
_TAG_UNESCAPE_RE: Final = re.compile(r"%(25|7B|7D)")
_GLOB_SPECIAL_RE: Final = re.compile(r"([*?\[\]\\])")


def _tag(text: str) -> str:
    """Text safe inside a hash tag: no brace can end or move it; never empty (an empty tag
    would make Redis hash the whole key)."""
    if "%" in text or "{" in text or "}" in text:  # rare: translate costs 4x the tests
        return text.translate(_TAG_ESCAPES)
    return text or "%"


def _untag(text: str) -> str:
    if text == "%":
        return ""
    return _TAG_UNESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _glob(text: str) -> str:
    return _GLOB_SPECIAL_RE.sub(r"\\\1", text)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Where each record lives. The hash tag (``{…}``) picks the Cluster slot: a triplet and
    its client share the client key's tag, so one question touches one slot; all rate keys
    share ``{rate}`` so a question's charges can be decided in one script.

    ``<prefix>:t:{<client>}|<sender>|<recipient>``  triplet hash (TTL: step's expiry)
    ``<prefix>:c:{<client>}``                       client hash (TTL: step's expiry)
    ``<prefix>:r:{rate}<rule>|<parts>``             rate TAT (TTL: TAT - now)
    ``<prefix>:{wl}``                               runtime whitelist hash (no TTL)
    ``<prefix>:{wl}:version``                       bumped on every whitelist change (no TTL)
    """

    prefix: str

    def triplet(self, key: str) -> str:
        """A triplet key's first ``|`` segment is its client key (checks.greylist.keys)."""
        head, sep, tail = key.partition(KEY_SEPARATOR)
        return f"{self.prefix}:t:{{{_tag(head)}}}{sep}{tail}"

    def triplet_key(self, redis_key: str) -> str:
        """The triplet key a Redis key was made from (inverse of ``triplet``)."""
        body = redis_key[len(self.prefix) + 4 :]
        tag, _, tail = body.partition("}")
        return _untag(tag) + tail

    def triplet_pattern(self, parts: Sequence[str | None]) -> str:
        """SCAN MATCH pattern: literal segments escaped, None as ``*`` (as SQLite's GLOB)."""
        head = "*" if not parts or parts[0] is None else _glob(_tag(parts[0]))
        rest = "".join(KEY_SEPARATOR + ("*" if p is None else _glob(p)) for p in parts[1:])
        return f"{_glob(self.prefix)}:t:{{{head}}}{rest}"

    def client(self, key: str) -> str:
        return f"{self.prefix}:c:{{{_tag(key)}}}"

    def rate(self, key: str) -> str:
        return f"{self.prefix}:r:{{rate}}{key}"

    def rate_key(self, redis_key: str) -> str:
        return redis_key[len(self.prefix) + len(":r:{rate}") :]

    def rate_pattern(self, parts: Sequence[str | None]) -> str:
        body = KEY_SEPARATOR.join("*" if p is None else _glob(p) for p in parts)
        return f"{_glob(self.prefix)}:r:{{rate}}{body}"

    @property
    def whitelist(self) -> str:
        return f"{self.prefix}:{{wl}}"

    @property
    def whitelist_version(self) -> str:
        """Same hash tag as the whitelist: one Cluster slot, so both go in one pipeline."""
        return f"{self.prefix}:{{wl}}:version"
