"""Load-test harness: `python -m loadtest` (also `pdserve bench`); see loadtest/cli.py."""
