"""The client's pure parts, in-process: the event-stream parser, the mapping of the
server's error bodies to exceptions, and the submission's field names."""
import orjson
import pytest

from offloadmq import (Conflict, NotFound, OffloadError, TaskCanceled, TaskFailed, TaskEvent,
                       TooManyRequests, WaitTimeout, _camel, _final_output, parse_events,
                       server_error)

pytestmark = pytest.mark.unit


def test_parse_events_splits_events_comments_and_keeps_the_incomplete_rest():
    text = (b": connected\n\nid: 7\nevent: end\ndata: {\"id\": {\"cap\": \"c\", \"id\": \"1\"}}\n\n"
            b"id: 8\nevent: log\ndata: {\"log\"")
    items, rest = parse_events(text)
    assert items == ["connected", TaskEvent("7", "end", {"id": {"cap": "c", "id": "1"}})]
    assert rest == b"id: 8\nevent: log\ndata: {\"log\""
    more, rest = parse_events(rest + b": \"x\"}\r\n\r\n: heartbeat\n\n")
    assert more == [TaskEvent("8", "log", {"log": "x"}), "heartbeat"] and rest == b""


@pytest.mark.parametrize("status, kind, cls", [(404, "not_found", NotFound), (409, "conflict", Conflict),
                                               (429, "too_many_requests", TooManyRequests),
                                               (504, "timeout", WaitTimeout)])
def test_error_bodies_become_the_servers_exception_classes(status, kind, cls):
    raw = orjson.dumps({"error": {"type": kind, "message": "why", "status": status},
                        "id": {"cap": "c", "id": "1"}})
    err = server_error(status, raw)
    assert type(err) is cls and err.status == status and err.message == "why"
    assert err.extra == {"id": {"cap": "c", "id": "1"}}


def test_unknown_types_and_bodies_stay_offload_errors_with_the_status():
    err = server_error(507, orjson.dumps({"error": {"type": "storage_full", "message": "disk",
                                                    "status": 507}}))
    assert isinstance(err, OffloadError) and err.status == 507 and err.type == "storage_full"
    err = server_error(502, b"<html>bad gateway</html>")
    assert type(err) is OffloadError and err.status == 502 and "bad gateway" in err.message


def test_final_output_raises_for_failed_and_canceled_tasks():
    assert _final_output({"status": "completed", "result": 3}) == 3
    assert _final_output({"status": "completed", "output": 4}) == 4
    with pytest.raises(TaskFailed) as err:
        _final_output({"status": "failed", "output": {"code": 2}, "log": "boom\n"})
    assert err.value.output == {"code": 2} and err.value.log == "boom\n"
    with pytest.raises(TaskCanceled):
        _final_output({"status": "canceled"})


def test_snake_case_fields_become_the_wire_names():
    assert [_camel(n) for n in ("max_retries", "run_at", "fetch_files", "priority", "maxWaitSecs")] == \
        ["maxRetries", "runAt", "fetchFiles", "priority", "maxWaitSecs"]
