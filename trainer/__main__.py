"""``python -m kubetune.trainer --config PATH``: the trainer pod's entry point.

Kept thin on purpose: ``--help`` and a bad command line answer at once, without importing
torch; :mod:`kubetune.trainer.run` does the work.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer",
        description="LoRA fine-tuning of a chat model from a resolved kubetune TrainerConfig.",
        epilog="Exit codes: 0 finished, 1 failed, 2 invalid job (data, config), 143 preempted "
        "(checkpoint saved; run again with the same output folder to resume).",
    )
    parser.add_argument("--config", required=True, help="TrainerConfig file (YAML or JSON)")
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kubetune.trainer import run

    return run.main(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
