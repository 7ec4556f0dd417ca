"""Checks shared by the script tests."""

import csv
import os

import torch


def assert_resumed_run_matches(full: dict, resumed: dict, n_eval_rows: int) -> None:
    """A resumed run wrote the same eval.csv and the same final actor_ft as an uninterrupted one."""
    def read(out: dict) -> list[dict]:
        with open(os.path.join(out["run_dir"], "eval.csv")) as f:
            return list(csv.DictReader(f))

    assert read(full) == read(resumed) and len(read(full)) == n_eval_rows
    a = torch.load(full["checkpoint"], weights_only=True)["actor_ft"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["actor_ft"]
    assert all(torch.equal(a[k], b[k]) for k in a)
