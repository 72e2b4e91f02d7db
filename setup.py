"""Install mmssm and build its compiled ops from kernels/.

The CPU kernels (the selective scan and the causal conv1d) and their
bindings (``kernels/bindings.cpp``) are built twice: ``mmssm._ext`` for a
generic x86-64, so that an extension built on one machine runs on any other
(an editable install or a shared home directory can move between CPUs), and
``mmssm._ext_avx2`` with AVX2 + FMA (x86-64 only; ``kernels/avx2/`` compiles
the same sources with ``MMSSM_ISA_AVX2``). mmssm/ops/ext.py loads the AVX2
one on a CPU that has it (``MMSSM_KERNEL_ISA=generic`` forces the other).
``MMSSM_WITH_OPS=0`` skips both (mmssm then falls back to its PyTorch scan
and conv with a warning); ``MMSSM_WITH_AVX2=0`` skips the AVX2 build.
``MMSSM_NATIVE=1`` adds ``-march=native`` to both: for this CPU only (an
illegal instruction, SIGILL, on a CPU without its instruction set
extensions). There are no CUDA sources of our own: on CUDA tensors the scan
runs through mamba-ssm (extra ``cuda``) and the conv through PyTorch.
"""

import os
from glob import glob

from setuptools import find_packages, setup


def read_requirements(name):
    """The requirements in ``requirements/<name>``, comments dropped."""
    with open(os.path.join('requirements', name)) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


def get_version():
    scope = {}
    with open(os.path.join('mmssm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def make_extensions():
    if os.getenv('MMSSM_WITH_OPS', '1') == '0':
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    # -Wno-psabi: the vector types of kernels/common/simd.h only pass
    # between inline functions, never across an ABI boundary.
    flags = ['-O3', '-std=c++20', '-fopenmp', '-Wno-psabi']
    if os.getenv('MMSSM_NATIVE', '0') == '1':
        flags.append('-march=native')
    sources = ['kernels/bindings.cpp', *sorted(glob('kernels/*/*.cpp'))]
    sources = [s for s in sources if not s.startswith('kernels/avx2/')]
    depends = sorted(glob('kernels/*/*.h')) + sources
    exts = [_extension('mmssm._ext', sources, depends, flags)]
    # The same kernels again for AVX2 + FMA, which mmssm/ops/ext.py loads
    # when the CPU has them: kernels/avx2/*.cpp include the generic sources
    # (own object files; the builds' symbols differ, kernels/common/isa.h).
    if os.getenv('MMSSM_WITH_AVX2', '1') != '0' and _is_x86_64():
        avx2 = sorted(glob('kernels/avx2/*.cpp'))
        flags_avx2 = [*flags, '-mavx2', '-mfma']
        exts.append(_extension('mmssm._ext_avx2', avx2, depends, flags_avx2))
    return exts, {'build_ext': BuildExtension}


def _extension(name, sources, depends, flags):
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        name=name,
        sources=sources,
        depends=depends,
        extra_compile_args={'cxx': flags},
        extra_link_args=['-fopenmp'],
    )


def _is_x86_64():
    import platform

    return platform.machine().lower() in ('x86_64', 'amd64')


ext_modules, cmdclass = make_extensions()

setup(
    name='mmssm',
    version=get_version(),
    description='Token-pruned vision state-space models for OpenMMLab',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['mmssm', 'mmssm.*']),
    install_requires=read_requirements('runtime.txt'),
    extras_require={
        'tests': read_requirements('tests.txt'),
        'cuda': read_requirements('cuda.txt'),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
