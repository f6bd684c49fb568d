"""python -m tests.golden.record [case ...]: rewrites tests/golden/data/*.safetensors, the recorded PEFT references
of every mixed-batch equivalence case (or of the named ones), under the installed versions (run it in the locked
environment: `make test` builds it).

Run it when a case changes (tests/golden/cases.py) or when the lock moves to a release whose PEFT references differ;
it refuses to record from a PEFT that the probe (tests/peft_probe.py) finds broken.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import tempfile
from pathlib import Path

from tests import peft_probe
from tests.golden.cases import CASES, DATA, build, save

log = logging.getLogger("golden")


def main(argv: list[str] | None = None) -> int:
    """Records every case, or the cases named on the command line (the others' files are left as they are: a
    re-recording moves their references by float rounding of the machine it runs on)."""
    names = (sys.argv[1:] if argv is None else argv) or CASES
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        log.error("unknown cases %s: expected some of %s", unknown, CASES)
        return 2
    logging.basicConfig(level="INFO", format="%(message)s")
    problems = peft_probe.broken()
    if problems:
        log.error("PEFT is not a sound reference here: %s", problems)
        return 1
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = build(name, Path(tmp) / name)
            path = DATA / f"{name}.safetensors"
            save(case, path, versions)
            log.info("%s: %d rows, %d bytes", path, len(case.tasks), path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
