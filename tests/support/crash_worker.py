"""Subprocess for the crash-safety test: records (or resumes) a run until it is killed or reaches --steps."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests` is a package
import torch
from tests.support.store_helpers import train

import explaind_store.recorder as recorder_mod

if __name__ == "__main__":
    path, steps, resume, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    torch.set_num_threads(1)
    orig = recorder_mod.Recorder.record

    def slow_record(self, *a, **k):  # spread updates out so SIGKILL lands at varied points
        orig(self, *a, **k)
        time.sleep(delay)

    recorder_mod.Recorder.record = slow_record
    train(path, steps, resume=resume, chunk_updates=4)
