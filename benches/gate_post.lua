-- wrk script for examples/gate_bench.rs: a gated POST with the bench subject.
wrk.method = "POST"
wrk.headers["x-api-key"] = "bench-user"
