"""Engines: fast implementations of the paper's operations, apart from the paper's math.

``conv``: convolution engines (im2col+GEMM, frequency domain) and their cost model.
``routing``: fused routing-by-agreement with its hand-written backward.
``precision``: the hand-written backward passes run with autocast off.
"""
