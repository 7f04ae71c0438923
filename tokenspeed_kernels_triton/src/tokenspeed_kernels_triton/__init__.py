"""Portable Triton kernels for TokenSpeed.

A plugin like any third party's: the entry point ``tokenspeed.kernels: triton`` names
``tokenspeed_kernels_triton.plugin``, whose hook registers one implementation per op family.
Each op family lives in its own module with a ``register(registry, common)`` function.
"""

__version__ = "0.1.0"
