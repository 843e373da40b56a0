"""The build step pyproject.toml cannot express: before the package is copied, generate the
gRPC stubs from the repository's proto/ (attnd_client/_protos.py, into attnd_client/attnd/,
git-ignored), then record which checkout the package was built from, so that the installed
package finds libattnd_c.so in that checkout's build folders (attnd_client/_cabi.py).

ATTND_BUNDLE_NATIVE_LIB=/path/to/libattnd_c.so at build time copies that library into the
package (attnd_client/_lib/), for an install that does not depend on the checkout.
"""

import importlib.util
import os
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_protos():
    spec = importlib.util.spec_from_file_location("attnd_client_protos",
                                                  HERE / "attnd_client" / "_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    def run(self):
        super().run()
        package = pathlib.Path(self.build_lib) / "attnd_client"
        # build/ persists between builds: nothing of an earlier one's extras may leak in.
        shutil.rmtree(package / "_lib", ignore_errors=True)
        (package / "_build_info.py").unlink(missing_ok=True)
        if (REPO / "client" / "capi" / "attnd_c.h").is_file():
            (package / "_build_info.py").write_text(
                f'"""Written by setup.py at build time."""\nREPO_ROOT = {str(REPO)!r}\n')
        bundle = os.environ.get("ATTND_BUNDLE_NATIVE_LIB")
        if bundle:
            (package / "_lib").mkdir(exist_ok=True)
            shutil.copy2(bundle, package / "_lib" / "libattnd_c.so")


# Before setup(): pyproject.toml lists the generated packages, and setuptools checks that they
# exist already when it prepares the metadata, before any build step runs (a fresh clone has no
# attnd_client/attnd/ yet).
_load_protos().generate()
setup(cmdclass={"build_py": BuildPy})
