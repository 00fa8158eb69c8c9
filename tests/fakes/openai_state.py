"""State and behaviour of the fake OpenAI fine-tuning API (``openai_finetune`` serves it).

Objects are the JSON dicts the API returns, shaped after openai-python 2.54's types
(``openai/types/file_object.py``, ``openai/types/fine_tuning/fine_tuning_job.py``,
``fine_tuning_job_event.py``). A job moves on a :class:`Clock`: ``validating_files`` (the file
is checked: JSONL, the method's format, at least ``min_examples``) → ``queued`` → ``running``
(one ``metrics`` event per step, ``auto`` hyperparameters resolved by OpenAI's rules) →
``succeeded`` with ``fine_tuned_model``, ``trained_tokens`` and a result file. State advances
lazily when a job is looked at, so nothing runs in the background. Errors are
:class:`ApiError` with OpenAI's status codes and ``{"error": {...}}`` bodies.

Uploads are processed after the upload has answered, as OpenAI does: a ``fine-tune`` file is
``uploaded`` (so says the upload's answer), then ``processed`` once ``Timing.processing_s``
has passed (0: at the next look), or ``error`` with ``status_details`` after
:meth:`FineTuneState.fail_next_file`. Creating a job on a file that is not ``processed`` is
refused with a 400, as OpenAI refuses it ("... is not ready").
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FINE_TUNABLE = (
    "gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano-2025-04-14", "gpt-3.5-turbo", "babbage-002", "davinci-002", "gpt-4o-mini",
)  # fmt: skip
PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
TERMINAL = {"succeeded", "failed", "cancelled"}
ORG = "org-kubetunefake"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key in its 401 message (a prefix and the last 4 characters)."""
    return key[:7] + "*" * max(4, len(key) - 11) + key[-4:] if len(key) > 11 else "sk-***"


@dataclass
class Timing:
    validating_s: float = 2.0
    queued_s: float = 2.0
    running_s: float = 10.0
    """Seconds from start to success, spread evenly over the job's steps."""
    processing_s: float = 0.0
    """Seconds a ``fine-tune`` upload stays ``uploaded`` before it is ``processed``; 0: the
    upload's answer says ``uploaded``, and any later look sees ``processed``."""


@dataclass
class Failure:
    status: int
    count: int = 1
    method: str | None = None
    path: str | None = None
    """Path prefix it applies to (``/v1/fine_tuning/jobs``); None: every API request."""
    retry_after: str | None = None
    retry_after_ms: str | None = None
    code: str | None = None
    """OpenAI's error code to answer with; ``insufficient_quota`` (with 429) is the account
    without quota or billing, not a rate limit."""
    after_handling: bool = False
    """Do the request, then answer the error: a lost answer (the job exists, the client
    does not know)."""
    delay: float = 0.0
    """Seconds to wait before answering (longer than the client's timeout: a timeout). With
    ``after_handling``, the request takes effect first: an operator killed meanwhile has made
    the job but never heard of it."""

    def error(self) -> ApiError:
        """The answer OpenAI gives for this status code."""
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = self.retry_after
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = self.retry_after_ms
        if self.status == 429 and self.code == "insufficient_quota":
            return ApiError(429, "You exceeded your current quota, please check your plan and "
                            "billing details. For more information on this error, read the docs: "
                            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                            type_="insufficient_quota", code="insufficient_quota",
                            headers=headers)  # fmt: skip
        if self.status == 429:
            return ApiError(429, "Rate limit reached for requests", type_="requests",
                            code="rate_limit_exceeded", headers=headers)  # fmt: skip
        if self.status == 401:
            return ApiError(401, "Incorrect API key provided: sk-***. You can find your API "
                            "key at https://platform.openai.com/account/api-keys.",
                            code="invalid_api_key", headers=headers)  # fmt: skip
        if self.status == 403:
            return ApiError(403, "You are not allowed to use fine-tuning in this project.",
                            code="permission_denied", headers=headers)  # fmt: skip
        if self.status >= 500:
            return ApiError(self.status, "The server had an error while processing your "
                            "request. Sorry about that!", type_="server_error",
                            headers=headers)  # fmt: skip
        return ApiError(self.status, "Injected error", headers=headers)


@dataclass
class Hold:
    """Keeps the next matching request waiting until :meth:`release` (a slow upload, say).

    The request is held before it is handled; other requests are answered meanwhile.
    """

    method: str | None = None
    path: str | None = None
    """Path prefix it applies to; None: every API request."""
    timeout: float = 30.0
    """Seconds after which a request is let go anyway (a test that forgot to release)."""
    arrived: threading.Event = field(default_factory=threading.Event)
    """Set when the held request has arrived."""
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class JobPlan:
    """How the next created job ends, instead of succeeding."""

    error: dict[str, Any] | None = None
    """``{"code", "message", "param"}`` the job fails with."""
    at_step: int = 0
    """0: fails while validating files; n: after step n of the run."""


class Clock:
    def __init__(self, *, frozen: bool, start: float | None = None) -> None:
        self.frozen = frozen
        self._base = time.time() if start is None else start
        self._offset = 0.0

    def now(self) -> float:
        return (self._base if self.frozen else time.time()) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


def _tokens(example: dict[str, Any]) -> int:
    """A rough, deterministic token count (about 3 characters per token, 4 per message)."""
    text = json.dumps(example, ensure_ascii=False)
    return 4 * text.count('"role"') + math.ceil(len(text) / 3)


def check_training_file(data: bytes, method: str, min_examples: int) -> tuple[list[int], str]:
    """Tokens per example, or an error message as OpenAI's file validation words it."""
    sizes: list[int] = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            return [], f"Invalid file format. Line {n} is not valid JSON."
        if method == "dpo":
            ok = isinstance(ex, dict) and all(
                k in ex for k in ("input", "preferred_output", "non_preferred_output")
            )
            want = "'input', 'preferred_output' and 'non_preferred_output'"
        else:
            msgs = ex.get("messages") if isinstance(ex, dict) else None
            ok = isinstance(msgs, list) and any(
                isinstance(m, dict) and m.get("role") == "assistant" for m in msgs
            )
            want = "a 'messages' list with an assistant message"
        if not ok:
            return [], f"Invalid file format. Example {len(sizes) + 1} must have {want}."
        sizes.append(_tokens(ex))
    if len(sizes) < min_examples:
        return [], (f"Training file has {len(sizes)} example(s), but must have at least "
                    f"{min_examples} examples")  # fmt: skip
    return sizes, ""


class FineTuneState:
    """The fake's state and behaviour, without HTTP (``openai_finetune.FakeOpenAI`` serves it)."""

    def __init__(self, *, api_keys: tuple[str, ...] = (), realtime: bool = False,
                 timing: Timing | None = None, min_examples: int = 10) -> None:  # fmt: skip
        self.api_keys = set(api_keys)
        """Accepted keys; empty accepts any bearer token."""
        self.clock = Clock(frozen=not realtime)
        self.timing = timing or Timing()
        self.min_examples = min_examples
        self.lock = threading.RLock()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self._processing: dict[str, tuple[float, str | None]] = {}  # id -> ready at, error
        self.next_file_error: str | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self._plans: dict[str, dict[str, Any]] = {}  # job id -> timeline, sizes, plan
        self.failures: list[Failure] = []
        self.holds: list[Hold] = []
        self.next_job: JobPlan | None = None
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.deleted_files: list[str] = []
        self._ids = itertools.count(1)
        self.base_url = ""

    # --------------------------------------------------------------------- ids and time

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}{secrets.token_hex(6)}"

    def _now(self) -> int:
        return int(self.clock.now())

    # --------------------------------------------------------------------- test controls

    def fail(self, status: int, **kw: Any) -> None:
        with self.lock:
            self.failures.append(Failure(status=status, **kw))

    def hold(self, method: str | None = None, path: str | None = None,
             timeout: float = 30.0) -> Hold:  # fmt: skip
        """Holds the next request matching ``method`` and ``path`` (a prefix) until released."""
        h = Hold(method, path, timeout)
        with self.lock:
            self.holds.append(h)
        return h

    def fail_next_job(self, code: str, message: str, param: str | None = None,
                      at_step: int = 0) -> None:  # fmt: skip
        with self.lock:
            self.next_job = JobPlan({"code": code, "message": message, "param": param}, at_step)

    def fail_next_file(self, details: str) -> None:
        """The next ``fine-tune`` upload ends ``error`` with these ``status_details``."""
        with self.lock:
            self.next_file_error = details

    def force_status(self, job_id: str, status: str) -> None:
        with self.lock:
            self._advance(self.jobs[job_id])
            self.jobs[job_id]["status"] = status
            self._plans[job_id]["forced"] = True

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.clock.advance(seconds)

    def finish_all(self) -> None:
        """Advance the clock past the end of every job."""
        self.advance(self.timing.validating_s + self.timing.queued_s + self.timing.running_s + 1)

    def jobs_created(self) -> int:
        return len(self.jobs)

    def leaks(self, needle: str) -> list[dict[str, Any]]:
        """Logged requests that carry ``needle`` anywhere but their Authorization header."""
        with self.lock:
            return [r for r in self.requests if needle in json.dumps(r, ensure_ascii=False)]

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            for job in self.jobs.values():
                self._advance(job)
            for f in self.files.values():
                self._process(f)
            return {
                "now": self.clock.now(),
                "jobs": [dict(j) for j in self.jobs.values()],
                "files": [dict(f) for f in self.files.values()],
                "jobs_created": len(self.jobs),
                "cancelled": list(self.cancelled),
                "deleted_files": list(self.deleted_files),
            }

    # --------------------------------------------------------------------- files

    def upload(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise ApiError(400, f"'{purpose}' is not one of {sorted(PURPOSES)} - 'purpose'",
                           param="purpose")  # fmt: skip
        if purpose == "fine-tune" and not filename.endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Fine-Tuning API. Must be .jsonl",
                           param="file")  # fmt: skip
        f = self._add_file(filename, data, purpose)
        if purpose == "fine-tune":
            f["status"] = "uploaded"
            ready_at = self.clock.now() + self.timing.processing_s
            self._processing[f["id"]] = (ready_at, self.next_file_error)
            self.next_file_error = None
        return dict(f)

    def _add_file(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        fid = self._id("file-")
        self.files[fid] = {
            "id": fid, "object": "file", "bytes": len(data), "created_at": self._now(),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None,
        }  # fmt: skip
        self.contents[fid] = data
        return self.files[fid]

    def _process(self, f: dict[str, Any]) -> dict[str, Any]:
        """Finishes processing an ``uploaded`` file whose time has come."""
        plan = self._processing.get(f["id"])
        if f["status"] == "uploaded" and plan is not None and self.clock.now() >= plan[0]:
            error = plan[1]
            f["status"], f["status_details"] = ("error", error) if error else ("processed", None)
        return f

    def file(self, fid: str) -> dict[str, Any]:
        if fid not in self.files:
            raise ApiError(404, f"No such File object: {fid}", param="id")
        return self._process(self.files[fid])

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        return [self._process(f) for f in self.files.values() if purpose in (None, f["purpose"])]

    def delete_file(self, fid: str) -> dict[str, Any]:
        self.file(fid)
        del self.files[fid], self.contents[fid]
        self.deleted_files.append(fid)
        return {"id": fid, "object": "file", "deleted": True}

    # --------------------------------------------------------------------- jobs

    def create_job(self, body: dict[str, Any], organization: str | None = None) -> dict[str, Any]:
        """Creates a job; ``organization`` is the ``OpenAI-Organization`` header, if sent
        (the job's ``organization_id``, as OpenAI reports the organization billed)."""
        for required in ("model", "training_file"):
            if not body.get(required):
                raise ApiError(400, f"Missing required parameter: '{required}'.",
                               param=required, code="missing_required_parameter")  # fmt: skip
        model = str(body["model"])
        if not (model.startswith("ft:") or any(model.startswith(m) for m in FINE_TUNABLE)):
            raise ApiError(400, f"Model {model} is not available for fine-tuning or does not "
                           "exist.", param="model", code="model_not_available")  # fmt: skip
        for param in ("training_file", "validation_file"):
            fid = body.get(param)
            if fid is None:
                continue
            f = self.files.get(fid)
            if f is None:
                raise ApiError(400, f"Invalid file ID: {fid}", param=param, code="invalid_file")
            if f["purpose"] != "fine-tune":
                raise ApiError(400, f"File {fid} has purpose '{f['purpose']}'; fine-tuning "
                               "needs purpose 'fine-tune'.", param=param)  # fmt: skip
            status = self._process(f)["status"]
            if status == "uploaded":
                raise ApiError(400, f"File '{fid}' is still being processed and is not ready "
                               "to be used for fine-tuning. Please try again later.",
                               param=param)  # fmt: skip
            if status == "error":
                raise ApiError(400, f"File '{fid}' could not be processed: "
                               f"{f['status_details']}", param=param,
                               code="invalid_file")  # fmt: skip
        suffix = body.get("suffix")
        if suffix is not None and len(str(suffix)) > 64:
            raise ApiError(400, "suffix must be at most 64 characters", param="suffix")
        metadata = body.get("metadata") or None
        if metadata is not None and (len(metadata) > 16 or any(
            len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in metadata.items()
        )):  # fmt: skip
            raise ApiError(400, "metadata: at most 16 string pairs, keys up to 64 and values "
                           "up to 512 characters", param="metadata")  # fmt: skip
        method = dict(body.get("method") or {"type": "supervised"})
        mtype = method.get("type", "supervised")
        if mtype not in ("supervised", "dpo"):
            raise ApiError(400, f"Unsupported method type: {mtype}", param="method.type")
        hp = dict((method.get(mtype) or {}).get("hyperparameters") or body.get("hyperparameters")
                  or {})  # fmt: skip
        for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            hp.setdefault(key, "auto")
        if mtype == "dpo":
            hp.setdefault("beta", "auto")
        now = self._now()
        jid = self._id("ftjob-")
        job = {
            "id": jid, "object": "fine_tuning.job", "created_at": now, "error": None,
            "fine_tuned_model": None, "finished_at": None,
            "hyperparameters": {k: v for k, v in hp.items() if k != "beta"},
            "model": model, "organization_id": organization or ORG, "result_files": [],
            "seed": body.get("seed") if body.get("seed") is not None else 42,
            "status": "validating_files", "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"), "estimated_finish": None,
            "integrations": [], "metadata": metadata, "suffix": suffix,
            "method": {"type": mtype, mtype: {"hyperparameters": hp}},
        }  # fmt: skip
        t = self.timing
        self._plans[jid] = {
            "queued_at": now + t.validating_s,
            "running_at": now + t.validating_s + t.queued_s,
            "running_s": t.running_s, "plan": self.next_job, "events": [], "forced": False,
            "steps_done": 0,
        }  # fmt: skip
        self.next_job = None
        self.jobs[jid] = job
        self._event(job, now, f"Validating training file: {job['training_file']}")
        if job["validation_file"]:
            self._event(job, now, f"Validating validation file: {job['validation_file']}")
        return self._public(job)

    def _public(self, job: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in job.items() if k != "suffix"}
        return json.loads(json.dumps(out))

    def job(self, jid: str) -> dict[str, Any]:
        if jid not in self.jobs:
            raise ApiError(404, f"Could not find fine tune job: {jid}", param="fine_tune_id",
                           code="fine_tune_not_found")  # fmt: skip
        job = self.jobs[jid]
        self._advance(job)
        return job

    def _event(self, job: dict[str, Any], at: float, message: str, *, level: str = "info",
               data: dict[str, Any] | None = None, type_: str = "message") -> None:  # fmt: skip
        self._plans[job["id"]]["events"].append({
            "id": self._id("ftevent-"), "object": "fine_tuning.job.event",
            "created_at": int(at), "level": level, "message": message,
            "data": data, "type": type_,
        })  # fmt: skip

    def _finish(self, job: dict[str, Any], at: float, status: str) -> None:
        job["status"], job["finished_at"], job["estimated_finish"] = status, int(at), None

    def _fail_job(self, job: dict[str, Any], at: float, error: dict[str, Any]) -> None:
        job["error"] = {"code": error["code"], "message": error["message"],
                        "param": error.get("param")}  # fmt: skip
        self._event(job, at, error["message"], level="error")
        self._finish(job, at, "failed")

    def _resolve(self, job: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
        """``auto`` hyperparameters resolved as OpenAI does when training starts."""
        n = max(1, len(sizes))
        hp = dict(job["method"][job["method"]["type"]]["hyperparameters"])
        if hp["n_epochs"] == "auto":
            epochs = 3
            if n * epochs < 100:
                epochs = min(25, math.ceil(100 / n))
            elif n * epochs > 25000:
                epochs = max(1, 25000 // n)
            hp["n_epochs"] = epochs
        if hp["batch_size"] == "auto":
            hp["batch_size"] = max(1, min(256, math.ceil(0.002 * n)))
        if hp["learning_rate_multiplier"] == "auto":
            hp["learning_rate_multiplier"] = 1.8
        if hp.get("beta") == "auto":
            hp["beta"] = 0.1
        return hp

    def _advance(self, job: dict[str, Any]) -> None:
        """Moves a job along its timeline up to now, emitting the events it crosses."""
        plan = self._plans[job["id"]]
        if job["status"] in TERMINAL or plan["forced"]:
            return
        now = self.clock.now()
        failure: JobPlan | None = plan["plan"]
        if job["status"] == "validating_files" and now >= plan["queued_at"]:
            at = plan["queued_at"]
            sizes, problem = check_training_file(
                self.contents.get(job["training_file"], b""), job["method"]["type"],
                self.min_examples,
            )  # fmt: skip
            if problem or (failure and failure.error and failure.at_step == 0):
                error = {
                    "code": "invalid_training_file",
                    "param": "training_file",
                    "message": f"The job failed due to an invalid training file. {problem}",
                }
                self._fail_job(job, at, error if problem else failure.error)  # type: ignore[union-attr]
                return
            plan["sizes"] = sizes
            job["status"] = "queued"
            self._event(job, at, "Files validated, moving job to queued state")
        if job["status"] == "queued" and now >= plan["running_at"]:
            at = plan["running_at"]
            hp = self._resolve(job, plan["sizes"])
            job["method"][job["method"]["type"]]["hyperparameters"] = hp
            job["hyperparameters"] = {k: v for k, v in hp.items() if k != "beta"}
            steps = math.ceil(len(plan["sizes"]) / hp["batch_size"]) * hp["n_epochs"]
            plan["total_steps"], plan["step_s"] = steps, plan["running_s"] / steps
            job["status"] = "running"
            job["estimated_finish"] = int(at + plan["running_s"])
            self._event(job, at, "Fine-tuning job started")
        if job["status"] == "running":
            self._run_steps(job, plan, now, failure)

    def _run_steps(self, job: dict[str, Any], plan: dict[str, Any], now: float,
                   failure: JobPlan | None) -> None:  # fmt: skip
        total, has_valid = plan["total_steps"], bool(job["validation_file"])
        while plan["steps_done"] < total:
            step = plan["steps_done"] + 1
            at = plan["running_at"] + step * plan["step_s"]
            if at > now:
                return
            plan["steps_done"] = step
            loss = round(0.3 + 2.2 * math.exp(-3.0 * step / total) + 0.05 * math.sin(step), 4)
            data: dict[str, Any] = {
                "step": step,
                "train_loss": loss,
                "total_steps": total,
                "train_mean_token_accuracy": round(1 - loss / 3, 4),
            }
            text = f"Step {step}/{total}: training loss={loss:.2f}"
            if has_valid and (step % 5 == 0 or step == total):
                data["valid_loss"] = round(loss * 1.1, 4)
                data["valid_mean_token_accuracy"] = round(1 - loss * 1.1 / 3, 4)
                text += f", validation loss={loss * 1.1:.2f}"
                if step == total:
                    data["full_valid_loss"] = round(loss * 1.08, 4)
                    data["full_valid_mean_token_accuracy"] = round(1 - loss * 1.08 / 3, 4)
            self._event(job, at, text, data=data, type_="metrics")
            if failure and failure.error and failure.at_step == step:
                self._fail_job(job, at, failure.error)
                return
        at = plan["running_at"] + plan["running_s"]
        epochs = job["hyperparameters"]["n_epochs"]
        suffix = job.get("suffix") or ""
        job["fine_tuned_model"] = f"ft:{job['model']}:kubetune-fake:{suffix}:{job['id'][-8:]}"
        job["trained_tokens"] = sum(plan["sizes"]) * epochs
        result = self._add_file("step_metrics.csv", b"step,train_loss\n", "fine-tune-results")
        job["result_files"] = [result["id"]]
        self._event(job, at, f"New fine-tuned model created: {job['fine_tuned_model']}")
        self._event(job, at, "The job has successfully completed")
        self._finish(job, at, "succeeded")

    def cancel(self, jid: str) -> dict[str, Any]:
        job = self.job(jid)
        if job["status"] in TERMINAL:
            raise ApiError(400, f"Job has already completed: {jid}", param=None)
        self._event(job, self.clock.now(), "Fine-tuning job cancelled")
        self._finish(job, self.clock.now(), "cancelled")
        self.cancelled.append(jid)
        return job

    def pause(self, jid: str, *, resume: bool) -> dict[str, Any]:
        job = self.job(jid)
        plan = self._plans[jid]
        if not resume and job["status"] == "running":
            job["status"], plan["forced"], plan["paused_at"] = "paused", True, self.clock.now()
            self._event(job, self.clock.now(), "Fine-tuning job paused")
        elif resume and job["status"] == "paused":
            plan["running_at"] += self.clock.now() - plan.pop("paused_at", self.clock.now())
            job["status"], plan["forced"] = "running", False
            self._event(job, self.clock.now(), "Fine-tuning job resumed")
        else:
            raise ApiError(400, f"Job {jid} is {job['status']}; cannot "
                           f"{'resume' if resume else 'pause'} it")  # fmt: skip
        return job

    def events(self, jid: str) -> list[dict[str, Any]]:
        self.job(jid)
        return list(reversed(self._plans[jid]["events"]))
