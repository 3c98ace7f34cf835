"""gRPC plumbing shared by every pdserve process: server construction (health, reflection, one
error interceptor), client channel options, proto <-> engine conversions, process lifecycle."""
