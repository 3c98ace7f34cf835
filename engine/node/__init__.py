"""The node runtime both `prefill_node` and `decode_node` run on: `base.py` (engine handle, stats,
request tracking, background cleanups) and `main.py` (flags, model loading, warm-up and probe,
health, READY line, drain, registration with a router). Built on the plumbing in `engine/rpc/`."""
