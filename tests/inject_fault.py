"""Test-only launcher: `python tests/inject_fault.py FAULT RECORD_DIR ssl-vit-args...` runs the real CLI with one
fault injected (works under `accelerate launch` too). RECORD_DIR receives what the tests check.

FAULT:
  nan_rank1   the loss is NaN on rank 1 at steps 2 and 3 (0-based), finite everywhere else
  nan_always  the loss is NaN on every rank at every step
  stall_save  the second checkpoint save stalls after Accelerate wrote its files (before rename + COMPLETE),
              having touched RECORD_DIR/saving, so the test can SIGKILL the process mid-save
  disk_full   the second checkpoint save fails on the last rank as torch's writer fails on a full disk (a file
              cut short, then RuntimeError "unexpected pos"), once per process
  crash       an error escapes the training step at step 2 (0-based), as a CUDA OOM or a bug would
  none        no fault
Every rank also writes RECORD_DIR/rank<R>.json: the shard URLs it drew and a hash of its final parameters.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import accelerate
import torch

import ssl_vit.data.shards as shards
import ssl_vit.training.loop as train
from ssl_vit.cli.main import main
from ssl_vit.methods.base import Objective

fault, record = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
drawn: list[str] = []

original_call = shards._ResampledShares.__call__


def recording_call(self):
    for item in original_call(self):
        drawn.append(item["url"])
        yield item


shards._ResampledShares.__call__ = recording_call

if fault in ("nan_rank1", "nan_always"):
    original_call_impl = Objective.__call__

    def nan_call(self, batch, step):
        out = original_call_impl(self, batch, step)
        if fault == "nan_always" or (rank == 1 and step in (2, 3)):
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    Objective.__call__ = nan_call

if fault == "crash":
    original_crash_impl = Objective.__call__

    def crashing_call(self, batch, step):
        if step == 2:
            raise RuntimeError("injected crash in step 2")
        return original_crash_impl(self, batch, step)

    Objective.__call__ = crashing_call

if fault == "stall_save":
    original_save = accelerate.Accelerator.save_state
    saves = []

    def stalling_save(self, *args, **kwargs):
        out = original_save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            (record / "saving").touch()
            time.sleep(600)
        return out

    accelerate.Accelerator.save_state = stalling_save

if fault == "disk_full":
    original_full_save = accelerate.Accelerator.save_state
    full_saves = []

    def full_disk_save(self, output_dir, *args, **kwargs):
        out = original_full_save(self, output_dir, *args, **kwargs)
        full_saves.append(1)
        if len(full_saves) == 2 and self.process_index == self.num_processes - 1:
            rng = Path(output_dir) / f"random_states_{self.process_index}.pkl"
            rng.write_bytes(rng.read_bytes()[:100])
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 214")
        return out

    accelerate.Accelerator.save_state = full_disk_save

original_run = train.Trainer.run


def recording_run(self):
    result = original_run(self)
    digest = hashlib.sha256()
    for name, tensor in sorted(self.objective.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    (record / f"rank{rank}.json").write_text(json.dumps({"drawn": sorted(set(drawn)), "step": self.step,
                                                         "params": digest.hexdigest()}))
    return result


train.Trainer.run = recording_run
torch.set_num_threads(1)
sys.exit(main(sys.argv[3:]))
