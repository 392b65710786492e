"""Build the optional C kernel for MM-obfuscation.

The extension is `optional`: without a C compiler the install still succeeds and
`tempo.core.obfuscation` falls back to a pure-torch implementation (bit-identical, slower).
OpenMP is used when the compiler supports it, so the kernel's threads come from the same
OpenMP pool as torch's (see _gather.c); otherwise the kernel uses POSIX threads.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self._supports("-fopenmp"):
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    def _supports(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
                self.compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=[flag])
            except Exception:  # noqa: BLE001 - any failure means: build without it
                return False
        return True


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "tempo.core._gather",
            sources=["tempo/core/_gather.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
