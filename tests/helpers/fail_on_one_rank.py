"""`ella run` under torchrun, with an error injected in one process only (rank 1, at its second training step)."""
import os
import sys

from ella import engine
from ella.cli import main

real, calls = engine.answer_token_nll, []


def answer_token_nll(model, batch):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        raise RuntimeError("injected failure on rank 1")
    return real(model, batch)


engine.answer_token_nll = answer_token_nll
sys.exit(main(sys.argv[1:]))
