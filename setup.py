"""Build the optional C kernel for MM-obfuscation.

The extension is `optional`: without a C compiler the install still succeeds and
`tempo.enclave.obfuscation` falls back to a pure-torch implementation (correct, ~10x slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tempo.enclave._gather",
            sources=["tempo/enclave/_gather.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
