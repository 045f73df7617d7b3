"""``alerts.log`` and the site's ``--on-flag`` command: what a scan does the moment a slide is flagged."""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .privacy import Names
from .status import DECISION_SUPPORT


class Alerts:
    """``alerts.log`` and the site's ``--on-flag`` command, the moment a slide is flagged.

    The command gets the slide path, the case id and the suspicion as arguments (and as
    ``WSI_APL_SLIDE``, ``WSI_APL_CASE``, ``WSI_APL_SUSPICION``); it runs in the background with a time
    limit, and its failure is written to ``alerts.log`` and the terminal, never stops the batch.
    """

    def __init__(self, out: Path, command: str | None, log: Callable[[str], None], timeout_s: float = 300.0,
                 names: Names | None = None):
        self.out = out
        self.names = names or Names()  # alerts.log names slides as the other outputs do
        self.argv = shlex.split(command) if command else None
        self.log = log
        self.timeout_s = timeout_s
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        with self._lock, open(self.out / "alerts.log", "a", encoding="utf-8") as f:
            f.write(line)

    def flag(self, path: Path, case: str, suspicion: float) -> None:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        shown = self.names.slide(path.name)
        self._write(f"{now}\tFLAGGED\t{shown}\tcase={case}\tsuspicion={suspicion:.3f}\t{DECISION_SUPPORT}\n")
        if self.argv:
            t = threading.Thread(target=self._run, args=(path, case, suspicion), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, path: Path, case: str, score: float) -> None:
        env = dict(os.environ, WSI_APL_SLIDE=str(path), WSI_APL_CASE=case, WSI_APL_SUSPICION=f"{score:.3f}")
        try:
            r = subprocess.run(self.argv + [str(path), case, f"{score:.3f}"], env=env, capture_output=True,
                               text=True, timeout=self.timeout_s)
            problem = f"exit status {r.returncode}: {r.stderr.strip()[-300:]}" if r.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if problem:
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            shown = self.names.slide(path.name)
            problem = self.names.text(problem, path)
            self._write(f"{now}\tON-FLAG FAILED\t{shown}\t{problem}\n")
            self.log(f"  WARNING: the --on-flag command failed for {shown} ({problem}); the flag is in "
                     "alerts.log and triage.csv")

    def wait(self) -> None:
        for t in self.threads:
            t.join(self.timeout_s + 5)
