#!/usr/bin/env python3
"""Generates attnd_client's gRPC stubs from proto/ now, instead of on first import.

    python3 client/python/gen_protos.py

Loads attnd_client/_protos.py on its own, so the package (which needs the stubs) is not
imported first.
"""

import importlib.util
import pathlib

path = pathlib.Path(__file__).resolve().parent / "attnd_client" / "_protos.py"
spec = importlib.util.spec_from_file_location("attnd_client_protos", path)
protos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(protos)
protos.generate(force=True)
print(f"generated stubs in {protos._GEN_DIR}")
