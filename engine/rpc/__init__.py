"""gRPC plumbing shared by every pdserve process: server construction (health, reflection, one
error interceptor), client channel options, security, proto <-> engine conversions, process
lifecycle. The ground floor: nothing here imports torch, the KV transports (`engine/kv_transfer/`)
or the node runtime (`engine/node/`), so the router and gateway load it without them."""
