"""A batch's output and error files, in OpenAI's batch output format: one JSON object per
line, keyed by the request's `custom_id`, in the input file's order.

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": JOB, "body": <chat.completion>},
     (or a text_completion, or an embeddings list for /v1/embeddings lines)
     "error": null}

A line that failed has its error body and status code in `response`; one that never ran
(the batch was cancelled or its window ended) has `response` null and `error` set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from farm.completion import Completion
from farm.errors import JobFailed
from farm.openai import api as openai
from farm.openai.embeddings import embeddings_response
from farm.registry.tables import BatchLineRecord, as_utc

NEVER_RAN = {"cancelled": "batch_cancelled", "expired": "batch_expired"}


def output_line(line: BatchLineRecord) -> dict[str, Any]:
    completion = Completion.model_validate(line.result)
    if completion.embeddings is not None:  # a /v1/embeddings line
        body = embeddings_response(completion, line.request.get("encoding_format", "float"))
    elif line.chat:
        body = openai.chat_response(completion)
    else:
        body = openai.completion_response(completion)
    if line.finished_at is not None:
        body["created"] = int(as_utc(line.finished_at).timestamp())
    return {
        "id": f"batch_req_{line.job_id}",
        "custom_id": line.custom_id,
        "response": {"status_code": 200, "request_id": line.job_id, "body": body},
        "error": None,
    }


def error_line(line: BatchLineRecord) -> dict[str, Any]:
    reason = line.error or f"the line ended {line.status}"
    request_id = line.job_id or f"{line.batch_id}-{line.line}"
    if line.status in NEVER_RAN and line.result is None:
        return {
            "id": f"batch_req_{request_id}",
            "custom_id": line.custom_id,
            "response": None,
            "error": {"code": NEVER_RAN[line.status], "message": reason},
        }
    status, body = openai.error(JobFailed(reason), chat=line.chat)
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def jsonl(lines: Iterator[BatchLineRecord], *, failed: bool) -> Iterator[str]:
    render = error_line if failed else output_line
    for line in lines:
        yield json.dumps(render(line), ensure_ascii=False) + "\n"
