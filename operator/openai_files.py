"""The dataset files of a ``provider: openai`` FineTuneJob on OpenAI: named by content, uploaded
once, and waited for until OpenAI has processed them (:mod:`openai_provider` creates the job only
then).

An upload's name is deterministic (``kubetune-<uid>-<role>-<sha256 prefix>.jsonl``): the
FineTuneJob, the role and the bytes decide it, so a tick after a lost answer finds the file
instead of uploading it again, and an edited dataset is a new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import IO

import openai
from openai.types import FileObject

from kubetune.api import jobstatus
from kubetune.operator import openai_errors as errors

log = logging.getLogger(__name__)

FILE_PREFIX = "kubetune-"

CHUNK_BYTES = 1 << 20
"""Read size when hashing a dataset."""

Dataset = bytes | Callable[[], AbstractContextManager[IO[bytes]]]
"""The JSONL bytes, or a function that opens them as a binary file (called only when an upload
is needed). A file is hashed and uploaded as a stream: memory does not grow with its size."""


@contextlib.contextmanager
def _opened(data: Dataset) -> Iterator[IO[bytes]]:
    if isinstance(data, bytes):
        yield io.BytesIO(data)
    else:
        with data() as f:
            yield f


def _sha256(f: IO[bytes]) -> tuple[str, int]:
    """The hex digest and size of ``f`` from where it is; leaves it there again."""
    start, digest, size = f.tell(), hashlib.sha256(), 0
    while chunk := f.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    f.seek(start)
    return digest.hexdigest(), size


def file_name(uid: str, role: str, sha256: str) -> str:
    """Deterministic upload name: the FineTuneJob, the role and the content's digest decide it."""
    return f"{FILE_PREFIX}{uid}-{role}-{sha256[:16]}.jsonl"


def files_of(client: openai.OpenAI, uid: str) -> list[FileObject]:
    """Every ``purpose=fine-tune`` file uploaded for this FineTuneJob UID, newest first."""
    prefix = f"{FILE_PREFIX}{uid}-"
    with errors.translated("listing files", errors.client_secrets(client)):
        page = client.files.list(purpose="fine-tune", order="desc", limit=10000)
        found = [f for f in page if f.filename.startswith(prefix)]
    return sorted(found, key=lambda f: f.created_at, reverse=True)


def ensure(
    client: openai.OpenAI,
    uid: str,
    remote: jobstatus.RemoteJob,
    training: Dataset,
    validation: Dataset | None,
) -> dict[str, FileObject]:
    """Fills ``remote.training_file`` / ``validation_file``: found by name, else uploaded.

    Returns the file objects seen on the way (by id), for :func:`waiting`. An upload is
    sent once (client retries off): OpenAI has no idempotency key for files, so a retry after a
    lost answer would store the file twice; the next tick finds the first one by its name.
    """
    wanted: list[tuple[str, Dataset]] = []
    if remote.training_file is None:
        wanted.append(("training", training))
    if validation is not None and remote.validation_file is None:
        wanted.append(("validation", validation))
    if not wanted:
        return {}
    existing: dict[str, FileObject] = {}
    for f in files_of(client, uid):
        if f.status != "error":
            existing.setdefault(f.filename, f)
    seen: dict[str, FileObject] = {}
    secrets = errors.client_secrets(client)
    once = client.with_options(max_retries=0)
    for role, dataset in wanted:
        with _opened(dataset) as body:
            digest, size = _sha256(body)
            name = file_name(uid, role, digest)
            found = existing.get(name)
            if found is None:
                with errors.translated(f"uploading the {role} file", secrets):
                    # a file object goes out in chunks (httpx's multipart), never whole
                    found = once.files.create(
                        file=(name, body, "application/jsonl"), purpose="fine-tune"
                    )
                log.info("uploaded %s file %s (%d bytes) for uid %s", role, found.id, size, uid)
        seen[found.id] = found
        if role == "training":
            remote.training_file = found.id
        else:
            remote.validation_file = found.id
    return seen


def waiting(
    client: openai.OpenAI, remote: jobstatus.RemoteJob, seen: Mapping[str, FileObject]
) -> str | None:
    """None when every recorded file is ``processed``; else what creation waits for.

    OpenAI processes an upload after answering it (status ``uploaded``, then ``processed`` or
    ``error``) and refuses to create a job on a file it has not processed yet. A file not
    known to be processed is looked at once more now (it usually is by then). A file in
    ``error`` fails the FineTuneJob with OpenAI's ``status_details``; a recorded file that is
    gone is forgotten, so the next tick uploads it again.
    """
    secrets = errors.client_secrets(client)
    pending: list[str] = []
    for role in ("training", "validation"):
        file_id = remote.training_file if role == "training" else remote.validation_file
        if file_id is None:
            continue
        f = seen.get(file_id)
        status = getattr(f, "status", None)  # None too from a server without the deprecated field
        if f is None or status != "processed":
            try:
                with errors.translated(f"reading the {role} file {file_id}", secrets):
                    f = client.files.retrieve(file_id)
            except errors.NotFoundProviderError:
                setattr(remote, f"{role}_file", None)
                pending.append(f"the {role} file {file_id} is gone; uploading it again")
                continue
            status = getattr(f, "status", None)
        if status == "error":
            details = errors.redact(str(f.status_details or "no details given"), secrets)
            raise errors.PermanentProviderError(
                f"OpenAI could not process the uploaded {role} file {file_id}: {details}",
                reason="FileProcessingFailed",
            )
        if status not in (None, "processed"):
            pending.append(f"OpenAI is processing the {role} file {file_id} (status {status})")
    return "; ".join(pending) or None
