#!/usr/bin/env python3
"""Writes tests/fixtures/hostile/: small checkpoint files that are valid containers holding
nothing a model can use. Standard library only: the layout is the one `torch.save` writes
(a zip whose `archive/data.pkl` is the pickled object), so no torch is needed.

    python3 scripts/make_hostile_fixtures.py
"""
import pathlib
import pickle
import zipfile

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hostile"
out.mkdir(parents=True, exist_ok=True)

# torch.save({}, "empty_state_dict.bin"): an empty state dict.
with zipfile.ZipFile(out / "empty_state_dict.bin", "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
print("wrote", out / "empty_state_dict.bin")
