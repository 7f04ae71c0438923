"""CUTLASS CuTe DSL MLA kernels for Blackwell (sm_100a) and Hopper (sm_90a).

A plugin like any third party's: entry point ``tokenspeed.kernels: cute`` ->
``tokenspeed_kernels_blackwell.plugin``. Without nvidia-cutlass-dsl, or without a suitable GPU,
the package still imports and its implementations are listed with the reason they cannot run.
"""

__version__ = "0.1.0"
