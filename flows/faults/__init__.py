"""Fault injection (``carrot bench faults`` and ``tests/faults/``): bad inputs, corrupt images and
killed runs, each scenario counted.

- `bad_inputs`: a catalogue of wrong command lines, files and stores; each must be refused with
  one line on stderr and exit code 2, before any Prefect flow starts.
- `kills`: ``carrot embed`` killed with SIGKILL at seeded moments, then rerun: the store must
  end identical to an uninterrupted run's, and never verify while incomplete.
- `run_kills`: ``carrot train`` and ``carrot finetune`` killed likewise: outputs whole, the
  rerun (``--resume``) finishing with the uninterrupted run's metrics.
- `report`: runs the scenarios and prints the counts.
"""
