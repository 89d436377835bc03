"""A usage log for `tollgate replay` speed runs (BENCHMARKS.md): N events
over SUBJECTS subjects (agent-0 ...), 10 ms apart from 2026-04-01, each the
bench request (100 input tokens, one job, 5 s of runtime), subjects picked
by the benches' xorshift. Usage: python3 benches/gen_usage_log.py N SUBJECTS [iso]
(`iso` writes RFC 3339 timestamps instead of Unix milliseconds)."""
import sys, datetime
n = int(sys.argv[1]); subjects = int(sys.argv[2]); iso = len(sys.argv) > 3
t0 = 1775001600000  # 2026-04-01T00:00:00Z
x = 0x9E3779B97F4A7C15
out = sys.stdout
for i in range(n):
    x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF; x ^= x >> 7; x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
    ts = t0 + i * 10
    t = ('"' + datetime.datetime.fromtimestamp(ts / 1000, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ') + '"') if iso else str(ts)
    out.write('{"ts": %s, "subject": "agent-%d", "amounts": {"llm_tokens_input": 100, "jobs": 1, "runtime_seconds": 5}}\n' % (t, x % subjects))
