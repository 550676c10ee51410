"""Build hook: generate the gRPC contract code before packaging.

All metadata lives in pyproject.toml; this file only makes ``build_py`` run
``cms.protogen`` so a wheel (for example the card agent's) carries ``cms.v1``.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _generate() -> None:
    spec = importlib.util.spec_from_file_location(
        "cms_protogen", Path(__file__).parent / "cms" / "protogen.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.generate() != 0:
        raise SystemExit("generating gRPC code from protos/ failed")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
