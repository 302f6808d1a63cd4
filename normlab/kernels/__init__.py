"""Fast kernel bodies, one folder per backend (``cpu``: native C++ operators, ``triton``: GPU).

A backend module registers the entry points of the kernel contract (:mod:`normlab.kernels.contract`: each
one's signature, shapes and dtypes) with :func:`normlab.dispatch.register_kernels` on import; it knows
nothing of modules or autograd — the op files call it through the dispatch point.
"""
