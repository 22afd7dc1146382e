"""kv_transfer_params (unit): one typed definition, and the wire as it always was."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pd.decode.scheduler_side import DecodeScheduler
from pd.prefill.scheduler_side import PrefillScheduler
from pd.transfer.metadata import PDHandshakeMetadata, load_spec_from_params
from pd.transfer.params import KVTransferParams

# What a prefill instance answered before the typed definition (vLLM's protocol keys
# plus pd's), byte for byte the same dict now.
PREFILL_ANSWER = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "engine-p",
    "remote_request_id": "req-1",
    "remote_host": "10.0.0.5",
    "remote_port": 5600,
    "remote_ports": [5600, 5601],
    "remote_block_ids": [4, 5, 6],
    "remote_num_tokens": 40,
    "tp_size": 2,
    "transport": "auto",
    "pd_protocol_version": 2,
}


def vllm_request(params: dict[str, Any] | None, status: str = "FINISHED_LENGTH_CAPPED"):
    """The fields of vllm.v1.request.Request the scheduler sides read."""
    from vllm.v1.request import RequestStatus

    return SimpleNamespace(
        request_id="req-1",
        kv_transfer_params=params,
        status=getattr(RequestStatus, status),
        num_computed_tokens=40,
        prompt_token_ids=list(range(41)),
    )


@pytest.mark.parametrize(
    "wire",
    [
        PREFILL_ANSWER,
        {"do_remote_decode": True},
        {"do_remote_decode": True, "pd_rendezvous": "tag"},
        {
            "remote_engine_id": "e",
            "remote_host": "h",
            "remote_port": 1,
            "do_remote_prefill": True,
            "pd_rendezvous": "tag",
        },
        {**PREFILL_ANSWER, "prompt_token_ids": [1, 2, 3]},
        {**PREFILL_ANSWER, "remote_prefill_cached_tokens": 7, "someone_elses": {"a": 1}},
    ],
)
def test_read_and_written_back_it_is_the_same_dict(wire: dict[str, Any]):
    assert KVTransferParams.from_dict(wire).to_dict() == wire


def test_prefill_scheduler_answers_exactly_as_before():
    scheduler = PrefillScheduler("engine-p", "auto")
    scheduler.set_workers(
        {0: PDHandshakeMetadata("10.0.0.5", 5600), 1: PDHandshakeMetadata("10.0.0.6", 5601)}
    )
    keep, answer = scheduler.request_finished(vllm_request({"do_remote_decode": True}), [4, 5, 6])
    assert keep is True
    assert answer == PREFILL_ANSWER
    assert list(answer) == list(PREFILL_ANSWER)  # and in the same order
    assert scheduler.take_grants() == ({"req-1": [4, 5, 6]}, {}, [])


def test_prefill_scheduler_ignores_requests_not_asking_for_decode():
    scheduler = PrefillScheduler("engine-p", "zmq")
    scheduler.set_workers({0: PDHandshakeMetadata("h", 1)})
    for params in (None, {}, {"do_remote_decode": False}, {"do_remote_decode": "yes"}):
        assert scheduler.request_finished(vllm_request(params), [1]) == (False, None)


def test_proxy_legs_are_written_as_before():
    assert KVTransferParams(do_remote_decode=True).to_dict() == {"do_remote_decode": True}
    address = KVTransferParams.from_dict(PREFILL_ANSWER).kv_address()
    decode_leg = address.replace(do_remote_prefill=True, pd_rendezvous="tag").to_dict()
    assert decode_leg == {
        "remote_engine_id": "engine-p", "remote_host": "10.0.0.5", "remote_port": 5600,
        "remote_ports": [5600, 5601], "tp_size": 2, "do_remote_prefill": True,
        "pd_rendezvous": "tag",
    }  # fmt: skip
    assert KVTransferParams.from_dict(PREFILL_ANSWER).answers_rendezvous()
    assert not KVTransferParams.from_dict({"pd_protocol_version": 1}).answers_rendezvous()


@pytest.mark.parametrize(
    ("wire", "key"),
    [
        ({"do_remote_decode": "true"}, "do_remote_decode"),
        ({"remote_port": "5600"}, "remote_port"),
        ({"remote_port": True}, "remote_port"),
        ({"remote_block_ids": [1, "2"]}, "remote_block_ids"),
        ({"remote_ports": 5600}, "remote_ports"),
        ({"remote_host": 5}, "remote_host"),
    ],
)
def test_a_key_of_the_wrong_type_is_named(wire: dict[str, Any], key: str):
    with pytest.raises(ValueError, match=f"kv_transfer_params.{key}"):
        KVTransferParams.from_dict(wire)


def test_load_spec_from_a_prefill_answer():
    params = KVTransferParams.from_dict(PREFILL_ANSWER)
    spec = load_spec_from_params("d-1", params, [8, 9], reports_completion=True)
    assert (spec.remote_request_id, spec.remote_engine_id, spec.remote_host) == (
        "req-1", "engine-p", "10.0.0.5",
    )  # fmt: skip
    assert spec.remote_ports == (5600, 5601)
    assert spec.remote_block_ids == (5, 6)  # decode's own cache held the first block
    older = KVTransferParams.from_dict({**PREFILL_ANSWER, "remote_ports": None})
    assert load_spec_from_params("d-1", older, [8], True).remote_ports == (5600,)
    for missing in ("remote_host", "remote_request_id", "remote_block_ids", "remote_engine_id"):
        params = KVTransferParams.from_dict({**PREFILL_ANSWER, missing: None})
        with pytest.raises(ValueError, match=f"lacks '{missing}'"):
            load_spec_from_params("d-1", params, [8], True)


def test_decode_scheduler_reads_the_params_and_loads_once():
    scheduler = DecodeScheduler()
    request = vllm_request(dict(PREFILL_ANSWER))
    # The prompt is 41 tokens, prefill computed 40: decode computes the last one itself.
    assert scheduler.get_num_new_matched_tokens(request, 0) == (40, True)
    blocks = SimpleNamespace(get_unhashed_block_ids=lambda: [7, 8, 9])
    scheduler.update_state_after_alloc(request, blocks, 40)
    scheduler.update_state_after_alloc(request, blocks, 40)  # vLLM may call it again
    loads, cancelled = scheduler.take_loads()
    assert [spec.local_block_ids for spec in loads] == [(7, 8, 9)] and cancelled == []
    assert request.kv_transfer_params == {**PREFILL_ANSWER, "do_remote_prefill": False}


def test_decode_scheduler_treats_malformed_params_as_none():
    scheduler = DecodeScheduler()
    request = vllm_request({**PREFILL_ANSWER, "remote_block_ids": "4,5"})
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.request_finished(request)
    assert scheduler.take_loads() == ([], [])
