"""Fixtures of the node tests: a tiny model and one prefill + one decode node process per module."""
from __future__ import annotations

import pytest

from tests.services.test_nodes import start_node


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def nodes(model_dir):
    decode = start_node("decode", model_dir)
    try:
        prefill = start_node("prefill", model_dir)
    except BaseException:
        decode.stop()
        raise
    yield prefill, decode
    codes = prefill.stop(), decode.stop()
    assert codes == (0, 0), (codes, "".join(prefill.stderr)[-1500:], "".join(decode.stderr)[-1500:])
