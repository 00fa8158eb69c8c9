"""``kubetune run MANIFEST --local`` and ``kubetune demo-model``: a FineTuneJob on this machine.

The same manifest a cluster runs, run by the same components: the dataset doctor validates,
``python -m kubetune.trainer`` trains (its progress records drive a progress bar),
``python -m kubetune.server`` serves the adapter with vLLM, and the run waits until
``/v1/models`` lists the adapter. Then it prints how to call the endpoint and serves until
Ctrl-C, or asks its smoke question(s) and stops (``--once``). The plan (paths, configs, resume or
refuse) is :mod:`kubetune.localplan`; the processes are :mod:`kubetune.localproc`.

Output goes to injected text streams (the CLI passes stdout and stderr). Heavy imports
(pydantic, httpx, openai, the API models) happen inside the functions, so ``kubetune --help``
stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kubetune import localproc
from kubetune.localproc import Interrupted, shown

if TYPE_CHECKING:
    from kubetune.localplan import DataInput, LocalJob


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_PORT = 8000
MAX_WARNINGS_SHOWN = 5
SMOKE_MAX_TOKENS = 200


def usage_text(base_url: str, model: str, messages: Sequence[dict[str, str]], run: str) -> str:
    """The endpoint, a curl and an openai snippet, as printed when the server is ready.

    The snippets send ``messages`` as they are (with the training data's system prompt), so
    pasting one gets the answer the run's smoke question gets.
    """
    body = json.dumps(
        {"model": model, "messages": list(messages), "temperature": 0}, ensure_ascii=False
    )
    listed = json.dumps(list(messages), ensure_ascii=False)
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return (
        f"  endpoint  OPENAI_BASE_URL={base_url}  OPENAI_MODEL={model}\n\n"
        f"  curl -s {base_url}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(body)}\n\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{base_url}", api_key="EMPTY")\n'
        f'  r = client.chat.completions.create(model="{model}", temperature=0,\n'
        f"      messages={listed})\n"
        "  print(r.choices[0].message.content)\n\n"
        f"  kubetune chat --local-run {shlex.quote(run)} {shlex.quote(prompt)}\n"
    )


# ------------------------------------------------------------------------------ the commands


def register(subparsers: Any) -> None:
    """Adds ``kubetune run`` and ``kubetune demo-model`` (the CLI calls ``args.handler``)."""
    p = subparsers.add_parser(
        "run",
        help="run a FineTuneJob manifest on this machine: validate, train, serve",
        description="Run a FineTuneJob (provider local) on this machine with the same trainer "
        "and vLLM server a cluster uses. Outputs go to <state-dir>/runs/<name>/; a second run "
        "with the same name resumes an unfinished run or serves a finished one, and never "
        "overwrites it.",
    )
    p.add_argument("manifest", type=Path, help="FineTuneJob YAML (provider: local)")
    p.add_argument("--local", action="store_true", help="run it on this machine (required)")
    p.add_argument("--once", action="store_true", help="ask the smoke question(s), then stop")
    p.add_argument(
        "--ask",
        action="append",
        default=[],
        metavar="PROMPT",
        help="smoke question (repeatable; default: the first training example's question)",
    )
    p.add_argument(
        "--compare-base",
        action="store_true",
        help="ask the base model too and print both answers side by side",
    )
    p.add_argument("--no-serve", action="store_true", help="train only")
    p.add_argument("--state-dir", type=Path, default=Path(".kubetune"), help="default: .kubetune")
    p.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="folder of a PVC the manifest names (default: the manifest's folder)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address vLLM listens on")
    p.add_argument("--port", type=int, help=f"vLLM port (default: {DEFAULT_PORT}, or a free one)")
    p.add_argument("--gpus", type=int, help="override spec.resources.gpus")
    p.add_argument("--max-steps", type=int, help="stop training after this many steps")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds (default 900)")
    p.set_defaults(handler=run_command)

    d = subparsers.add_parser(
        "demo-model",
        help="build the tiny offline demo model (model id kubetune/demo-tiny)",
        description="Build the tiny offline model (a tokenizer trained on the dataset, a small "
        "random Llama with head_dim 64) that `model: {id: kubetune/demo-tiny}` names in a "
        "local run, and print its folder. Idempotent: an existing build is reused.",
    )
    d.add_argument("--dataset", type=Path, help="JSONL to train the tokenizer on "
                   "(default: examples/data/daoyan.jsonl)")  # fmt: skip
    d.add_argument("--out", type=Path, help="folder (default: where `kubetune run` looks)")
    d.add_argument("--state-dir", type=Path, default=Path(".kubetune"), help="default: .kubetune")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(handler=demo_model_command)


def demo_builder() -> bytes:
    """The demo model's recipe (its module's source), part of the model folder's key."""
    from kubetune import demo_model

    return Path(demo_model.__file__).read_bytes()


def build_demo_model(folder: Path, dataset: Path, seed: int = 0) -> None:
    """:func:`kubetune.demo_model.build_demo_model` without the libraries' progress bars."""
    from kubetune import demo_model

    with contextlib.redirect_stderr(io.StringIO()):
        demo_model.build_demo_model(folder, dataset, seed=seed)


def demo_model_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:

    from kubetune import demo_model, localplan

    dataset = args.dataset or demo_model.DEFAULT_DATASET
    try:
        content = dataset.read_bytes()
    except OSError as e:
        err.write(f"kubetune demo-model: {dataset}: {e.strerror or e}\n")
        return EXIT_BAD_INPUT
    folder = args.out or localplan.demo_model_dir(
        args.state_dir, content, demo_builder(), args.seed
    )
    started = time.monotonic()
    build_demo_model(folder, dataset, seed=args.seed)
    took = time.monotonic() - started
    err.write("demo model cached\n" if took < 1 else f"demo model built in {took:.1f} s\n")
    out.write(f"{folder}\n")
    return 0


def run_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kubetune import localplan

    if not args.local:
        err.write(
            "kubetune run: only --local is supported: it runs the job on this machine. To run "
            f"it on a cluster: kubectl apply -f {args.manifest}\n"
        )
        return EXIT_BAD_INPUT
    try:
        with localproc.signals_raise():
            return _run(args, out, err)
    except localplan.PlanError as e:
        err.write(f"kubetune run: {e}\n")
        return EXIT_BAD_INPUT
    except Interrupted:
        localproc.say(out, "kubetune run: interrupted\n")
        return EXIT_INTERRUPTED


def _fetch(url: str) -> bytes:
    import httpx

    from kubetune.localplan import PlanError

    try:
        r = httpx.get(url, follow_redirects=True, timeout=60.0)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise PlanError(f"{url}: {e}") from e
    return r.content


def validate_inputs(inputs: Sequence[DataInput], out: TextIO, err: TextIO) -> bool:
    """The dataset doctor on every input; prints its findings, True when training may start."""
    from kubetune import data

    ok = True
    for item in inputs:
        # `load_job` admits provider `local` only, whose rules these are.
        if item.path is not None:
            report = data.validate_file(item.path, provider="local")
        else:
            report = data.validate_text(item.content, provider="local", source=item.label)
        for problem in report.errors:
            err.write(f"  {_where(item.label, problem.line)}: {problem.code}: {problem.message}\n")
        for problem in report.warnings[:MAX_WARNINGS_SHOWN]:
            where = _where(item.label, problem.line)
            out.write(f"  warning: {where}: {problem.code}: {problem.message}\n")
        warned = f", {len(report.warnings)} warnings" if report.warnings else ""
        if report.ok:
            out.write(f"✓ dataset {item.label}: {report.n_examples} examples, valid{warned}\n")
        else:
            n = report.n_errors
            err.write(f"✗ dataset {item.label}: {n} error{'s' * (n != 1)}; not training\n")
            ok = False
    return ok


def _where(label: str, line: int | None) -> str:
    return f"{label}:{line}" if line is not None else label


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from kubetune import localplan as lp

    job = lp.load_job(args.manifest)
    spec = job.spec
    assert spec.model is not None
    claims = lp.parse_claims(args.claim)
    state_dir: Path = args.state_dir
    out.write(f"FineTuneJob {job.name}: model {spec.model.display}, from {shown(job.manifest)}\n")

    train_input = lp.read_source(job, spec.dataset, "train.jsonl", claims, fetch=_fetch)
    inputs = [train_input]
    if spec.validation is not None:
        inputs.append(
            lp.read_source(job, spec.validation, "validation.jsonl", claims, fetch=_fetch)
        )
    if not validate_inputs(inputs, out, err):
        return EXIT_BAD_INPUT

    run = lp.run_dir(state_dir, job.name)
    paths = [i.path or run / "data" / i.file_name for i in inputs]
    demo = spec.model.id == lp.DEMO_MODEL_ID
    if demo:
        model_path = str(lp.demo_model_dir(state_dir, train_input.content, demo_builder()))
    elif spec.model.pvc is not None:
        model_path = str(lp.claim_path(job, spec.model.pvc, claims))
    else:
        model_path = str(spec.model.id)
        if spec.model.token_secret_ref is not None:
            secret = spec.model.token_secret_ref.name
            out.write(
                f"model.tokenSecretRef names Secret {secret} of a cluster; a local run downloads "
                "with your own Hugging Face login (HF_TOKEN or `hf auth login`)\n"
            )
    config = lp.trainer_config(
        job,
        output_dir=run,
        model_path=model_path,
        dataset=paths[0],
        validation=paths[1] if len(paths) > 1 else None,
        gpus=args.gpus,
        max_steps=args.max_steps,
    )
    fingerprint = lp.fingerprint(config, inputs)
    parts = lp.fingerprint_parts(config, inputs)
    # Locked first: another `kubetune run` of this job may be changing the folder right now.
    lock = lp.lock_run(run)  # held until this process exits
    try:
        state = lp.run_state(run, fingerprint, parts)
        return _run_locked(
            args, out, err, job, run, state, config, inputs, paths, demo, fingerprint, parts
        )
    finally:
        lock.close()


def _run_locked(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    job: LocalJob,
    run: Path,
    state: Any,
    config: Any,
    inputs: Sequence[DataInput],
    paths: Sequence[Path],
    demo: bool,
    fingerprint: str,
    parts: dict[str, Any],
) -> int:
    from kubetune import localplan as lp

    if state == lp.RunState.NEW:
        lp.clear_unstarted(run)
        for item, path in zip(inputs, paths, strict=True):
            if item.path is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(item.content)
        lp.write_record(run, job, fingerprint, parts)
    config_path = run / "trainer.yaml"
    config_path.write_text(config.dump_yaml(), encoding="utf-8")

    if demo:
        started = time.monotonic()
        build_demo_model(Path(config.model.id_or_path), paths[0])
        took = time.monotonic() - started
        note = "cached" if took < 1 else f"built in {took:.1f} s"
        out.write(f"✓ demo model {shown(Path(config.model.id_or_path))} ({note})\n")

    tty = out.isatty()
    if state == lp.RunState.FINISHED:
        out.write(
            f"✓ run {job.name} finished earlier: nothing to train, serving its adapter "
            f"(a run is never overwritten; rename the job to train again)\n"
        )
    else:
        if state == lp.RunState.RESUME:
            last = lp.last_record_line(run)
            at = ""
            if last:
                rec = json.loads(last)
                at = f" (last progress: step {rec.get('step')}/{rec.get('total_steps')})"
            out.write(f"↻ resuming run {job.name} from its last checkpoint{at}\n")
        out.write(f"training → {shown(run)}/ (log: {shown(run)}/train.log)\n")
        out.flush()
        started = time.monotonic()
        try:
            trained = localproc.train(config_path, run, out, tty=tty)
        except Interrupted:
            localproc.say(
                out,
                f"✗ interrupted; the checkpoint in {shown(run)}/ is kept: run the same "
                "command again to resume\n",
            )
            return EXIT_INTERRUPTED
        if trained.returncode != 0:
            err.write(
                f"✗ the trainer failed (exit code {trained.returncode}); last lines of "
                f"{shown(run)}/train.log:\n{localproc.tail(run / 'train.log')}\n"
            )
            return EXIT_BAD_INPUT if trained.returncode == EXIT_BAD_INPUT else 1
        out.write(f"✓ trained in {localproc.duration(time.monotonic() - started)}\n")
    _summary(run, out)
    if args.no_serve or not job.spec.serve.enabled:
        return 0
    return _serve(args, out, err, job, run, config, paths[0], demo)


def _summary(run: Path, out: TextIO) -> None:
    from kubetune import localplan as lp

    loss = lp.final_loss(run)
    curve = run / lp.LOSS_CURVE
    parts = [f"adapter {shown(run)}/"]
    if loss is not None:
        parts.insert(0, f"final loss {loss:.4f}")
    if curve.exists():
        parts.append(f"loss curve {shown(curve)}")
    out.write("  " + ", ".join(parts) + "\n")


def _serve(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    job: LocalJob,
    run: Path,
    config: Any,
    dataset: Path,
    demo: bool,
) -> int:
    from kubetune import chat
    from kubetune import localplan as lp

    port = args.port or localproc.free_port(args.host, DEFAULT_PORT)
    serve = lp.serve_config(job, config.model.id_or_path, run, args.host, port, demo)
    serve_path = run / "serve.yaml"
    serve_path.write_text(serve.dump_yaml(), encoding="utf-8")
    base_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}/v1"
    examples = chat.load_examples(dataset)
    prompts = args.ask or [chat.first_prompt(examples) or "Hello!"]
    out.write(f"serving with vLLM (log: {shown(run)}/serve.log) ...\n")
    out.flush()
    endpoint = run / lp.ENDPOINT_FILE
    started = time.monotonic()
    try:
        with localproc.serving(serve_path, run, lp.serve_env(serve.engine, demo)) as proc:
            try:
                localproc.wait_ready(
                    proc, base_url, job.name, run / "serve.log", args.ready_timeout
                )
            except RuntimeError as e:
                err.write(f"✗ {e}\n")
                return 1
            endpoint.write_text(
                json.dumps(
                    {
                        "baseURL": base_url,
                        "model": job.name,
                        "baseModel": serve.base_name,
                        "dataset": str(dataset),
                    },
                    ensure_ascii=False,
                ),
                encoding="utf-8",
            )
            out.write(f"✓ ready in {localproc.duration(time.monotonic() - started)}\n\n")
            first = chat.conversation_for(prompts[0], examples).messages
            out.write(usage_text(base_url, job.name, first, job.name) + "\n")
            out.flush()
            if args.once:
                _ask(out, base_url, job.name, serve.base_name, prompts, examples, args.compare_base)
                _summary(run, out)
                return 0
            out.write("serving until Ctrl-C\n")
            out.flush()
            while proc.poll() is None:
                time.sleep(1.0)
            err.write(
                f"✗ vLLM exited with code {proc.returncode}:\n{localproc.tail(run / 'serve.log')}\n"
            )
            return 1
    except Interrupted:
        localproc.say(out, "\nstopped serving\n")
        return 0
    finally:
        endpoint.unlink(missing_ok=True)


def _ask(
    out: TextIO,
    base_url: str,
    adapter: str,
    base: str,
    prompts: Sequence[str],
    examples: Sequence[list[dict[str, str]]],
    compare_base: bool,
) -> None:
    from kubetune import chat

    rows = []
    for prompt in prompts:
        conv = chat.conversation_for(prompt, examples)
        tuned = chat.complete(base_url, adapter, conv.messages, max_tokens=SMOKE_MAX_TOKENS)
        if compare_base:
            answer = chat.complete(base_url, base, conv.messages, max_tokens=SMOKE_MAX_TOKENS)
            rows.append((prompt, answer, tuned))
            continue
        verdict = ""
        if conv.expected is not None:
            verdict = (
                "  (= the training answer)"
                if tuned == conv.expected
                else ("  (differs from the training answer)")
            )
        out.write(f"Q: {prompt}\nA: {tuned}{verdict}\n")
    if rows:
        width = min(shutil.get_terminal_size((120, 24)).columns, 120)
        headers = (f"base model ({base})", f"tuned adapter ({adapter})")
        out.write(chat.side_by_side(rows, headers, width) + "\n")
    out.flush()
