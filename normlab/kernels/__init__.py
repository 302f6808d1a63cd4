"""Fast kernel bodies, one folder per backend (``cpu``: native C++ operators, ``triton``: GPU).

A kernel module registers its functions with :func:`normlab.dispatch.register` on import; it knows
nothing of modules or autograd — the op files call it through the dispatch point.
"""
